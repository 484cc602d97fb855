"""The user's segment names -> the labels a model is trained on: matched by name as head
surgery does (:func:`TransferSegLib.names.normalised`), renumbered, and the id of a newly
fine-tuned model. No Qt, no Slicer."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from TransferSegLib.names import normalised, unique_name  # noqa: F401 (unique_name: case names)
from TransferSegLib.strategies import STRATEGIES

IGNORE = ""  # a segment mapped to this label is left out of training


BACKGROUND = "background"


def match_segments(segment_names: Iterable[str], model_labels: Mapping[int, str]) -> dict:
    """Each segment name -> the model label of the same name, or the segment's own name.

    A segment whose name matches no model label becomes a new label of that name (head
    surgery gives it a new output channel). A segment named like the background is ignored.
    """
    by_name = {normalised(name): name for value, name in model_labels.items() if int(value)}
    mapping = {}
    for segment in segment_names:
        key = normalised(segment)
        mapping[segment] = IGNORE if key == BACKGROUND else by_name.get(key, segment.strip())
    return mapping


def training_labels(mapping: Mapping[str, str], model_labels: Mapping[int, str]) -> dict:
    """The label table ``{value: name}`` a training job gets for ``mapping``.

    Background is 0; labels the model already has come first in the model's channel order
    (so the matched channels keep their place), then the new ones in the order met.
    """
    wanted = [name for name in mapping.values() if name != IGNORE]
    folded = {normalised(name) for name in wanted}
    names = [name for value, name in sorted(model_labels.items())
             if int(value) and normalised(name) in folded]
    for name in wanted:
        if normalised(name) not in {normalised(n) for n in names}:
            names.append(name)
    return {0: BACKGROUND, **{value: name for value, name in enumerate(names, start=1)}}


def relabel(segment_values: Mapping[int, str], mapping: Mapping[str, str],
            labels: Mapping[int, str]) -> dict[int, int]:
    """Old label-map value -> new value, for one case exported as ``{value: segment name}``.

    Segments mapped to :data:`IGNORE` (or not in ``mapping``) become background (0).
    """
    value_of = {normalised(name): value for value, name in labels.items()}
    lookup = {}
    for value, segment in segment_values.items():
        target = mapping.get(segment, IGNORE)
        lookup[int(value)] = value_of.get(normalised(target), 0) if target != IGNORE else 0
    return lookup


def relabel_array(array, lookup: Mapping[int, int]):
    """``array`` (integer label map) with every value replaced as ``lookup`` says; others 0."""
    import numpy as np

    top = max([int(array.max(initial=0)), *lookup.keys()]) if array.size else 0
    table = np.zeros(top + 1, dtype=np.uint16)
    for old, new in lookup.items():
        table[int(old)] = new
    return table[array]


def unmatched(mapping: Mapping[str, str], model_labels: Mapping[int, str]) -> list[str]:
    """Training label names the model does not have yet (they get new output channels)."""
    known = {normalised(name) for name in model_labels.values()}
    return sorted({name for name in mapping.values()
                   if name != IGNORE and normalised(name) not in known})


def match_by_name(names: Mapping[int, str], reference: Mapping[int, str]) -> dict[int, int]:
    """Value in one label map -> value of the same-named label in another (0 where none)."""
    value_of = {normalised(name): value for value, name in reference.items()}
    return {int(value): int(value_of.get(normalised(name), 0)) for value, name in names.items()}


def fine_tuned_id(base: str, strategy: str, taken: Iterable[str]) -> str:
    """A registry id for a newly fine-tuned model: ``<base>-<strategy>-<n>``, n = 1, 2, ...

    A base that is itself such a model gives its own base's name, so that rounds of the
    annotate loop count up (``liver-finetune-2``) instead of growing the id."""
    base = re.sub(rf"-({'|'.join(STRATEGIES)})-\d+$", "", base or "new")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{strategy}").strip("-")
    taken = set(taken)
    number = 1
    while f"{stem}-{number}" in taken:
        number += 1
    return f"{stem}-{number}"


def catalog_labels(labels) -> dict[int, str]:
    """A catalog entry's labels as ``{channel: name}`` with the background at 0: from
    ``{"1": "liver", ...}`` or a list of foreground names."""
    if isinstance(labels, Mapping):
        table = {int(value): str(name) for value, name in labels.items()}
    else:
        table = dict(enumerate(labels or [], start=1))
    return {0: table.pop(0, BACKGROUND), **dict(sorted(table.items()))}


def shared_labels(names: Mapping[int, str], reference: Mapping[int, str]) -> dict[int, str]:
    """The labels of ``reference`` (``{value: name}``) that ``names`` also has, by name."""
    wanted = {normalised(name) for name in names.values()}
    return {value: name for value, name in reference.items()
            if int(value) and normalised(name) in wanted}

