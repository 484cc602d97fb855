"""Coded anatomy: a label name -> Slicer's ``TerminologyEntry`` (SNOMED CT), for the
structures of Slicer's "3D Slicer General Anatomy list" that published models segment.

The codes are those of that list (Slicer's Terminologies module,
SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json): category "Anatomical Structure"
(SCT 123037004), the structure's type, and a laterality modifier where the list has one.
A name matches after :func:`TransferSegLib.names.normalised` ("kidney_left" ->
"kidney left"); a name the list does not hold gets no code (never a guess). No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping

from TransferSegLib.names import normalised

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
CATEGORY = ("123037004", "Anatomical Structure")
SIDES = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}
# structure -> (SNOMED CT code, meaning, whether the list gives it a laterality modifier)
TYPES = {
    "adrenal gland": ("23451007", "Adrenal gland", True),
    "aorta": ("15825003", "Aorta", False),
    "brain": ("12738006", "Brain", False),
    "duodenum": ("38848004", "Duodenum", False),
    "esophagus": ("32849002", "Esophagus", False),
    "gallbladder": ("28231008", "Gallbladder", False),
    "heart": ("80891009", "Heart", False),
    "kidney": ("64033007", "Kidney", True),
    "liver": ("10200004", "Liver", False),
    "lung": ("39607008", "Lung", True),
    "pancreas": ("15776009", "Pancreas", False),
    "prostate": ("41216001", "Prostate", False),
    "spinal cord": ("2748008", "Spinal cord", False),
    "spleen": ("78961009", "Spleen", False),
    "sternum": ("56873002", "Sternum", False),
    "stomach": ("69695003", "Stomach", False),
    "trachea": ("44567001", "Trachea", False),
    "bladder": ("89837001", "Bladder", False),
}
ALIASES = {"urinary bladder": "bladder", "oesophagus": "esophagus", "gall bladder": "gallbladder"}


def entry(name: str) -> str | None:
    """The TerminologyEntry of label ``name``, or None when the list has no such structure."""
    words = normalised(name).split()
    sides = [w for w in words if w in SIDES]
    structure = " ".join(w for w in words if w not in SIDES)
    structure = ALIASES.get(structure, structure)
    if structure not in TYPES or len(sides) > 1:
        return None
    code, meaning, lateral = TYPES[structure]
    if sides and not lateral:
        return None
    modifier = "SCT^{}^{}".format(*SIDES[sides[0]]) if sides else "^^"
    return (f"{CONTEXT}~SCT^{CATEGORY[0]}^{CATEGORY[1]}~SCT^{code}^{meaning}~{modifier}"
            f"~{REGION_CONTEXT}~^^~^^")


def terminology(labels: Mapping[int, str]) -> dict[str, str]:
    """Label name -> TerminologyEntry for the labels (background excluded) the list codes."""
    found = {}
    for value, name in labels.items():
        if int(value) and (code := entry(name)):
            found[name] = code
    return found
