"""Training loss for multi-class 3D segmentation with partial labels, and a hard-label Dice.

:class:`SegmentationLoss` is soft Dice + cross-entropy on logits of shape (N, C, Z, Y, X) against
a label map of channel indices (0 = background). It supports *partial labels*: a base model
trained on a collection where each source dataset draws only some organs (Humpire-Mamani et al.,
"Transfer learning from a sparsely annotated dataset of 3D medical images", arXiv 2311.05032)
sees voxels labelled background that may really be an organ nobody drew in that dataset. The
``annotated`` argument, a bool (N, C) tensor, says which classes are drawn in each sample; a
class that is not annotated must not be punished for being predicted there. Two ways:

``partial="exclude"`` (default)
    Per sample, the unannotated channels are taken out of the softmax: the class distribution is
    renormalised over the annotated channels only, ``q_c = exp(z_c) / sum_{k annotated} exp(z_k)``.
    The loss then says nothing at all about the unannotated classes: the gradient with respect
    to their logits is exactly zero, so the network learns them only from samples that draw them.
    The annotated-background "group" is plain background.

``partial="marginal"`` (the marginal loss of Shi et al., "Marginal loss and exclusion loss for
partially supervised multi-organ segmentation", Medical Image Analysis 2021)
    The softmax runs over all C channels; per sample, the probabilities of the unannotated
    classes are added to background, ``q_0 = p_0 + sum_{k not annotated} p_k``, and the
    unannotated channels are dropped. A voxel labelled background is then rewarded for being
    "background or any undrawn organ", so the unannotated logits *do* get gradient: they are
    pushed up together with background where the label says background and down where it says
    an annotated organ. Unlike "exclude", it still teaches that an undrawn organ is not any of
    the drawn ones. (Shi et al.'s separate *exclusion* loss is not implemented here.)

With every class annotated both modes are the same ordinary Dice + CE.

Definitions, with ``q`` the per-voxel distribution above (float32), ``g`` the one-hot target and
``V`` the voxels whose target is not :data:`IGNORE`:

* ``ce = sum_{v in V} w[t_v] * (-log q_{t_v}(v)) / sum_{v in V} w[t_v]`` — the mean over
  non-ignored voxels, weighted by ``class_weights`` as ``torch.nn.functional.cross_entropy``
  weights it (``w = 1`` without weights; 0 when ``V`` is empty);
* for each sample ``n`` and each *annotated foreground* class ``c`` (``c >= 1``):
  ``d[n, c] = 1 - (2 * sum_V q_c g_c + smooth) / (sum_V q_c + sum_V g_c + smooth)``; classes
  annotated but absent from a sample's target still count (predicting them costs up to 1);
  ``dice = sum w[c] d[n, c] / sum w[c]`` over those (n, c) pairs (0 when there are none);
  background is never in the Dice term (it would dominate it);
* ``loss = dice_weight * dice + ce_weight * ce``.

In "marginal" mode the merged background is only in the CE term (Dice is over foreground), so
the Dice term uses the plain all-channel softmax of the annotated foreground classes.

:func:`dice_per_class` scores hard label maps for validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Target value for voxels outside the loss (padding outside the scan, unknown regions).
IGNORE = -1

PARTIAL_MODES = ("exclude", "marginal")


class SegmentationLoss(nn.Module):
    """Soft Dice + cross-entropy with partial labels; see the module docstring for the formulas.

    Args:
        dice_weight: factor of the Dice term (>= 0).
        ce_weight: factor of the cross-entropy term (>= 0).
        smooth: added to the numerator and denominator of each Dice ratio (> 0); keeps a class
            absent from both prediction and target at a loss of ~0 instead of 0/0.
        partial: how classes missing from ``annotated`` are handled, "exclude" or "marginal".
        class_weights: C non-negative weights, one per channel (background first), for the CE
            voxels and the Dice (sample, class) pairs; None weighs all equally.
        dice_exclude: channels left out of the Dice term (they stay in the cross-entropy),
            e.g. a base's labels kept beside the new ones (:mod:`TransferSegLib.context`).

    ``forward(logits, target, annotated=None)`` returns a float32 scalar.
    """

    class_weights: torch.Tensor | None

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1e-5,
        partial: str = "exclude",
        class_weights: Sequence[float] | None = None,
        dice_exclude: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if partial not in PARTIAL_MODES:
            raise ValueError(f"partial must be one of {PARTIAL_MODES}, not {partial!r}.")
        if dice_weight < 0 or ce_weight < 0:
            raise ValueError(
                f"dice_weight and ce_weight must be >= 0, not {dice_weight} and {ce_weight}."
            )
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0 (it prevents 0/0 in Dice), not {smooth}.")
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.smooth = float(smooth)
        self.partial = partial
        if class_weights is None:
            self.class_weights = None
        else:
            weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if weights.ndim != 1 or len(weights) == 0:
                raise ValueError("class_weights must be a non-empty sequence of numbers.")
            if not torch.all(torch.isfinite(weights) & (weights >= 0)) or weights.sum() <= 0:
                raise ValueError(
                    f"class_weights must be finite, >= 0 and not all 0, not {weights.tolist()}."
                )
            # Not persistent: the weights are a training setting, not part of a model file.
            self.register_buffer("class_weights", weights, persistent=False)
        self.dice_exclude = frozenset(int(c) for c in dice_exclude)

    def extra_repr(self) -> str:
        return (
            f"dice_weight={self.dice_weight}, ce_weight={self.ce_weight}, smooth={self.smooth}, "
            f"partial={self.partial!r}"
        )

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        annotated: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``logits`` against ``target``, as a float32 scalar tensor.

        Args:
            logits: (N, C, Z, Y, X) unnormalised scores, any float dtype (float16/bfloat16
                under autocast is fine: the loss is computed in float32). Any number of spatial
                axes works the same way.
            target: (N, 1, Z, Y, X) or (N, Z, Y, X) integer channel indices in [0, C), or
                :data:`IGNORE` for voxels left out of both terms.
            annotated: (N, C) bool, True where class c is drawn in sample n; column 0
                (background) must be all True. None means every class in every sample.

        Raises:
            ValueError: shapes or dtypes that do not fit, target values out of range,
                background not annotated, or a target voxel of a class not annotated in its
                sample (the annotation table and the label map disagree: a caller bug).
        """
        target, annotated = _check_inputs(logits, target, annotated)
        n, c = logits.shape[:2]
        spatial = tuple(range(2, logits.ndim))
        view = (n, c) + (1,) * len(spatial)
        ann = annotated.view(view)

        # Autocast would run some of these ops in half precision; sums over a million voxels
        # and log of small probabilities need float32.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits.float()
            valid = target != IGNORE
            index = target.clamp(min=0).unsqueeze(1)  # ignored voxels point at 0, masked below

            present = torch.stack([torch.bincount(t[v], minlength=c)[:c] > 0
                                   for t, v in zip(target, valid, strict=True)])
            stray = present & ~annotated
            if torch.any(stray):
                sample, cls = (int(i) for i in stray.nonzero()[0])
                raise ValueError(
                    f"target of sample {sample} contains class {cls}, which annotated marks as "
                    "not drawn in that sample; fix the annotation table or the label map."
                )

            log_q = self._log_distribution(x, ann)

            weights = self.class_weights
            if weights is None:
                weights = torch.ones(c, device=x.device)
            elif len(weights) != c:
                raise ValueError(
                    f"class_weights has {len(weights)} entries but logits have {c} channels."
                )
            weights = weights.to(x.device)

            voxel_weight = weights[index.squeeze(1)] * valid
            nll = -log_q.gather(1, index).squeeze(1)
            # tiny only matters when every voxel is ignored (then the numerator is 0 too).
            ce = (nll * voxel_weight).sum() / voxel_weight.sum().clamp(
                min=torch.finfo(torch.float32).tiny
            )

            # The Dice term, over the foreground channels it covers only (background is never
            # in it: it would dominate it; nor are the dice_exclude channels).
            channels = torch.tensor([k for k in range(1, c) if k not in self.dice_exclude],
                                    dtype=torch.long, device=x.device)
            shape = (1, len(channels)) + (1,) * len(spatial)
            scored = valid.unsqueeze(1)
            q = log_q.index_select(1, channels).exp() * ann[:, channels] * scored
            onehot = (index == channels.view(shape)) & scored
            intersection = (q * onehot).sum(dim=spatial)
            denominator = q.sum(dim=spatial) + onehot.sum(dim=spatial)
            dice_loss = 1 - (2 * intersection + self.smooth) / (denominator + self.smooth)
            pair_weight = annotated[:, channels].float() * weights[channels]
            dice = (dice_loss * pair_weight).sum() / pair_weight.sum().clamp(
                min=torch.finfo(torch.float32).tiny
            )

            return self.dice_weight * dice + self.ce_weight * ce

    def _log_distribution(self, x: torch.Tensor, ann: torch.Tensor) -> torch.Tensor:
        """log q, (N, C, ...) float32: finite on annotated channels, 0 on the others.

        The unannotated entries are set to 0 (not -inf) so that no later product or sum meets
        -inf * 0 = NaN; every use multiplies them out or never reads them (``gather`` at a
        target index, which is always annotated).
        """
        if self.partial == "exclude":
            # -inf logits drop out of the softmax exactly; masked_fill passes no gradient to
            # the filled entries, so the unannotated logits get exactly zero gradient.
            log_q = torch.log_softmax(x.masked_fill(~ann, float("-inf")), dim=1)
        else:
            log_p = torch.log_softmax(x, dim=1)
            merged = ~ann
            merged[:, 0] = True  # the group: background plus every unannotated class
            log_background = torch.logsumexp(
                log_p.masked_fill(~merged, float("-inf")), dim=1, keepdim=True
            )
            log_q = torch.cat([log_background, log_p[:, 1:]], dim=1)
        return log_q.masked_fill(~ann, 0.0)


def _check_inputs(
    logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``target`` as long (N, Z, Y, X) and ``annotated`` as bool (N, C)."""
    if logits.ndim < 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float tensor of shape (N, C, Z, Y, X), not {logits.dtype} "
            f"{tuple(logits.shape)}."
        )
    n, c = logits.shape[:2]
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer channel indices, not {target.dtype}.")
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != (n,) + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: "
            "expected (N, 1, Z, Y, X) or (N, Z, Y, X) with the logits' N and Z, Y, X."
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}.")
    target = target.long()
    bad = (target != IGNORE) & ((target < 0) | (target >= c))
    if torch.any(bad):
        raise ValueError(
            f"target values must be in [0, {c}) or IGNORE ({IGNORE}); found "
            f"{sorted(set(target[bad].unique().tolist()))[:10]}."
        )
    if annotated is None:
        annotated = torch.ones(n, c, dtype=torch.bool, device=logits.device)
    else:
        if annotated.dtype != torch.bool:
            raise ValueError(f"annotated must be a bool tensor, not {annotated.dtype}.")
        if annotated.shape != (n, c):
            raise ValueError(
                f"annotated shape {tuple(annotated.shape)} does not fit logits: expected "
                f"(N, C) = ({n}, {c})."
            )
        annotated = annotated.to(logits.device)
        if not torch.all(annotated[:, 0]):
            samples = (~annotated[:, 0]).nonzero().flatten().tolist()
            raise ValueError(
                f"background (channel 0) must be annotated in every sample; it is not in "
                f"sample(s) {samples}."
            )
    return target, annotated


def dice_per_class(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Dice of each class between two hard label maps, for validation.

    Args:
        prediction: (Z, Y, X) or (N, Z, Y, X) integer labels in [0, num_classes).
        target: the same shape, labels in [0, num_classes) or :data:`IGNORE` (voxels that are
            not scored, whatever the prediction says there).
        num_classes: C, background (0) included.

    Returns:
        (C,) float64: ``2 |P_c & T_c| / (|P_c| + |T_c|)`` for each class c, with a batch pooled
        into one count per class (all N volumes together); NaN where class c is in neither map.
    """
    if prediction.shape != target.shape or prediction.ndim not in (3, 4):
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must share "
            "one shape, (Z, Y, X) or (N, Z, Y, X)."
        )
    for name, labels in (("prediction", prediction), ("target", target)):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer labels, not {labels.dtype}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, not {num_classes}.")
    prediction = prediction.long().flatten()
    target = target.long().flatten().to(prediction.device)
    scored = target != IGNORE
    prediction, target = prediction[scored], target[scored]
    for name, labels in (("prediction", prediction), ("target", target)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} labels must be in [0, {num_classes}); found "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
    # Confusion matrix rows = target, columns = prediction, in one bincount.
    confusion = torch.bincount(
        target * num_classes + prediction, minlength=num_classes * num_classes
    ).view(num_classes, num_classes).double()
    overlap = confusion.diagonal()
    total = confusion.sum(dim=0) + confusion.sum(dim=1)
    # 0/0 gives NaN by itself: exactly the "absent from both" value wanted.
    return 2 * overlap / total
