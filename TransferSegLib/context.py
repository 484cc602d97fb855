"""The base's own labels kept beside the new ones while fine-tuning (``--base-labels``).

A model fine-tuned on one scan learns its labels against everything else that scan shows as
background. A new patient's scan that shows more (a chest above an abdominal training scan)
has structures the training never named, and a fine-tuned model calls them whatever they
resemble: the heart liver, the scapulae spleen (bench/README.md, "A third patient"). The base
knew them. Kept as output channels and taught, on the training scans, what the base itself
says there (its own predictions, where the annotation says background), they stay in the
competition for every voxel: a voxel the base calls heart has a channel that says so. This is
learning without forgetting (Li and Hoiem, 2017) with the base's hard labels as the targets.

Modes (:data:`~TransferSegLib.settings.BASE_LABEL_MODES`):

``drop``
    the base's other labels are dropped by head surgery, as before.
``context``
    kept and learnt as above; ``segment`` writes them as background (their ``label_values``
    are 0), so the new model gives the user's labels only.
``keep``
    kept, learnt and segmented too: the new model gives the base's labels and the new ones.

The kept labels carry no Dice term, only cross-entropy: twenty base labels against one new
label would otherwise outweigh it in the Dice mean. Patches are still centred on the user's
labels only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.names import normalised
from TransferSegLib.sampling import PreparedCase


def extra_labels(base_card: ModelCard, names: Sequence[str]) -> list[str]:
    """The base's labels (not its background) that are not among ``names``, in its order."""
    wanted = {normalised(name) for name in names}
    return [name for channel, name in sorted(base_card.labels.items())
            if channel and normalised(name) not in wanted]


def unusable(base_card: ModelCard, card: ModelCard) -> str:
    """Why the base cannot label the new model's training scans ('' when it can): it must
    read the same input the new model is trained on."""
    if base_card.in_channels != card.in_channels:
        return (f"the base takes {base_card.in_channels} image channel(s) and the data has "
                f"{card.in_channels}")
    if base_card.normalisation != card.normalisation or base_card.modality != card.modality:
        return (f"the base reads {base_card.modality or 'its own'} intensities and the data is "
                f"{card.modality or 'another modality'}")
    if list(base_card.spacing) != list(card.spacing) or \
            base_card.orientation != card.orientation:
        return "the base's voxel grid differs from the new model's"
    return ""


@dataclass
class BaseContext:
    """The base network that labels each training case's background with its own labels.

    ``channels`` maps a base output channel to the new model's channel of the same label.
    """

    model: torch.nn.Module
    card: ModelCard
    channels: dict[int, int]
    device: str = "auto"
    overlap: float = 0.25
    labelled: dict[str, int] = field(default_factory=dict)  # case name -> voxels relabelled

    @property
    def new_channels(self) -> list[int]:
        return sorted(self.channels.values())

    def __call__(self, case: PreparedCase) -> PreparedCase:
        """``case`` with its annotated background voxels given the base's labels there."""
        from TransferSegLib.inference import predict_prepared, select_device

        base = predict_prepared(self.model, self.card, case.image,
                                select_device(self.device), self.overlap)
        lookup = np.zeros(self.card.out_channels, np.int16)
        for old, new in self.channels.items():
            lookup[old] = new
        relabelled = lookup[base]
        fill = (case.target == 0) & (relabelled > 0)
        target = np.where(fill, relabelled, case.target).astype(case.target.dtype)
        annotated = case.annotated.copy()
        annotated[self.new_channels] = True
        self.labelled[case.name] = int(fill.sum())
        return replace(case, target=target, annotated=annotated)

    def scored(self, case: PreparedCase) -> PreparedCase:
        """``case`` as validation scores it: the base's labels are not the user's."""
        annotated = case.annotated.copy()
        annotated[self.new_channels] = False
        annotated[0] = True
        return replace(case, annotated=annotated)
