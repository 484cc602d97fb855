"""Tests for TransferSegLib.losses: known values, an independent reference, partial-label
gradients, ignored voxels, errors, float16, and the hard-label Dice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from TransferSegLib.losses import IGNORE, SegmentationLoss, dice_per_class

SMOOTH = 1e-5


def random_problem(n: int = 2, c: int = 4, shape=(4, 5, 6), seed: int = 0):
    """(logits (N, C, *shape) float32, target (N, *shape) long with every class present)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((n, c, *shape), generator=generator)
    target = torch.randint(0, c, (n, *shape), generator=generator)
    target.view(n, -1)[:, :c] = torch.arange(c)  # every class in every sample
    return logits, target


def reference_loss(logits, target, weights=None, smooth=SMOOTH):
    """Dice + CE written independently of the module: torch's cross_entropy and a loop Dice."""
    ce = F.cross_entropy(logits, target, weight=weights)
    probs = torch.softmax(logits, dim=1)
    terms, term_weights = [], []
    for n in range(logits.shape[0]):
        for c in range(1, logits.shape[1]):
            p, g = probs[n, c], (target[n] == c).float()
            terms.append(1 - (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth))
            term_weights.append(1.0 if weights is None else float(weights[c]))
    w = torch.tensor(term_weights)
    dice = (torch.stack(terms) * w).sum() / w.sum()
    return dice + ce


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", ["exclude", "marginal"])
def test_perfect_logits_give_near_zero_loss(partial):
    _, target = random_problem()
    logits = 50.0 * F.one_hot(target, 4).movedim(-1, 1).float()
    loss = SegmentationLoss(partial=partial)(logits, target)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() < 1e-4


def test_uniform_logits_give_large_loss():
    _, target = random_problem()
    loss = SegmentationLoss()(torch.zeros(2, 4, 4, 5, 6), target)
    # CE alone is log(4) = 1.39 and each Dice term is far from 0.
    assert loss.item() > 0.5
    assert loss.item() > math.log(4)


def test_sgd_steps_reduce_the_loss():
    logits, target = random_problem(seed=1)
    logits = logits.clone().requires_grad_(True)
    criterion = SegmentationLoss()
    optimizer = torch.optim.SGD([logits], lr=50.0)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = criterion(logits, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))


@pytest.mark.parametrize("weighted", [False, True])
def test_fully_annotated_modes_equal_an_independent_reference(weighted):
    logits, target = random_problem(seed=2)
    weights = [0.5, 1.0, 2.0, 3.0] if weighted else None
    expected = reference_loss(logits, target, torch.tensor(weights) if weighted else None)
    everything = torch.ones(2, 4, dtype=torch.bool)
    for partial in ("exclude", "marginal"):
        criterion = SegmentationLoss(partial=partial, class_weights=weights)
        for annotated in (None, everything):
            # Both target layouts, (N, Z, Y, X) and (N, 1, Z, Y, X).
            for labels in (target, target.unsqueeze(1)):
                loss = criterion(logits, labels, annotated)
                assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_term_weights_scale_the_terms():
    logits, target = random_problem(seed=3)
    dice = SegmentationLoss(ce_weight=0.0)(logits, target)
    ce = SegmentationLoss(dice_weight=0.0)(logits, target)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=1e-6)
    combined = SegmentationLoss(dice_weight=2.0, ce_weight=0.5)(logits, target)
    assert combined.item() == pytest.approx(2 * dice.item() + 0.5 * ce.item(), abs=1e-6)


def test_annotated_but_absent_class_is_penalised_when_predicted():
    # Class 2 is drawn in the sample but absent from its target: predicting it must cost.
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    # A wide margin: with smooth = 1e-5, even ~1e-7 of stray probability mass shows in Dice.
    clean = 50.0 * F.one_hot(target, 3).movedim(-1, 1).float()
    spurious = clean.clone()
    spurious[0, 2, 3] = 100.0  # class 2 predicted in a quarter of the volume
    criterion = SegmentationLoss(ce_weight=0.0)
    assert criterion(clean, target).item() < 1e-4
    # The class-2 pair's Dice term is ~1; averaged over the two foreground pairs: ~0.5.
    assert criterion(spurious, target).item() == pytest.approx(0.5, abs=1e-3)


# --- partial labels --------------------------------------------------------------------------


def partial_problem():
    """Batch of 2, C = 3: sample 0 draws class 1 only, sample 1 draws class 2 only."""
    logits, _ = random_problem(n=2, c=3, seed=4)
    target = torch.zeros(2, 4, 5, 6, dtype=torch.long)
    target[0, :2] = 1
    target[1, 2:] = 2
    annotated = torch.tensor([[True, True, False], [True, False, True]])
    return logits, target, annotated


def test_exclude_gives_exactly_zero_gradient_to_unannotated_logits():
    logits, target, annotated = partial_problem()
    logits.requires_grad_(True)
    loss = SegmentationLoss(partial="exclude")(logits, target, annotated)
    loss.backward()
    grad = logits.grad
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    for n in range(2):
        for c in range(3):
            if annotated[n, c]:
                assert torch.all(grad[n, c] != 0), (n, c)
            else:
                assert torch.all(grad[n, c] == 0), (n, c)


def test_exclude_equals_the_loss_with_unannotated_channels_deleted():
    logits, target, annotated = partial_problem()
    criterion = SegmentationLoss(partial="exclude")
    batch = criterion(logits, target, annotated)
    # Sample by sample with the unannotated channel cut out and labels renumbered, the
    # fully-annotated reference applies; the batch averages CE over voxels and Dice over pairs,
    # and each sample has the same voxel count and one foreground pair.
    kept = [[0, 1], [0, 2]]
    ce, dice = [], []
    for n in range(2):
        sub_logits = logits[n : n + 1, kept[n]]
        sub_target = (target[n : n + 1] > 0).long()
        ce.append(F.cross_entropy(sub_logits, sub_target))
        dice.append(reference_loss(sub_logits, sub_target) - ce[-1])
    expected = sum(ce) / 2 + sum(dice) / 2
    assert batch.item() == pytest.approx(expected.item(), abs=1e-6)


def test_exclude_ignores_unannotated_logits_values():
    logits, target, annotated = partial_problem()
    changed = logits.clone()
    changed[0, 2] += 7.0 * torch.randn_like(changed[0, 2])
    changed[1, 1] -= 3.0
    criterion = SegmentationLoss(partial="exclude")
    assert criterion(changed, target, annotated).item() == pytest.approx(
        criterion(logits, target, annotated).item(), abs=1e-6
    )


def test_marginal_equals_a_hand_merged_distribution():
    logits, target, annotated = partial_problem()
    logits.requires_grad_(True)
    loss = SegmentationLoss(partial="marginal")(logits, target, annotated)

    probs = torch.softmax(logits.detach(), dim=1)
    nll, dice_terms = [], []
    for n in range(2):
        drawn = 1 if n == 0 else 2
        undrawn = 3 - drawn
        merged_bg = probs[n, 0] + probs[n, undrawn]
        foreground = probs[n, drawn]
        is_fg = target[n] == drawn
        nll.append(torch.where(is_fg, -foreground.log(), -merged_bg.log()).flatten())
        g = is_fg.float()
        inter, total = (foreground * g).sum(), foreground.sum() + g.sum()
        dice_terms.append(1 - (2 * inter + SMOOTH) / (total + SMOOTH))
    expected = torch.cat(nll).mean() + torch.stack(dice_terms).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)

    # Unlike "exclude", the unannotated channel is part of the merged background and learns.
    loss.backward()
    assert torch.all(torch.isfinite(logits.grad))
    assert torch.any(logits.grad[0, 2] != 0) and torch.any(logits.grad[1, 1] != 0)


def test_modes_differ_when_a_class_is_unannotated():
    logits, target, annotated = partial_problem()
    exclude = SegmentationLoss(partial="exclude")(logits, target, annotated)
    marginal = SegmentationLoss(partial="marginal")(logits, target, annotated)
    assert abs(exclude.item() - marginal.item()) > 1e-3


# --- ignored voxels --------------------------------------------------------------------------


@pytest.mark.parametrize("partial", ["exclude", "marginal"])
def test_ignored_voxels_do_not_change_the_loss(partial):
    logits, target = random_problem(seed=5)
    target[:, 0] = IGNORE  # the first slice of each sample is "outside the scan"
    criterion = SegmentationLoss(partial=partial)
    changed = logits.clone()
    changed[:, :, 0] = 100.0 * torch.randn_like(changed[:, :, 0])
    base = criterion(logits, target)
    assert criterion(changed, target).item() == pytest.approx(base.item(), abs=1e-6)
    # And the ignored voxels really are out: the reference on the remaining slices agrees.
    expected = reference_loss(logits[:, :, 1:], target[:, 1:])
    assert base.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.isfinite(base)


def test_all_voxels_ignored_gives_zero_and_a_gradient():
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2, 2), IGNORE)
    loss = SegmentationLoss()(logits, target)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    assert torch.all(torch.isfinite(logits.grad))


# --- errors ----------------------------------------------------------------------------------


def test_background_must_be_annotated():
    logits, target, annotated = partial_problem()
    annotated[1, 0] = False
    with pytest.raises(ValueError, match=r"background \(channel 0\).*sample\(s\) \[1\]"):
        SegmentationLoss()(logits, target, annotated)


def test_target_holding_an_unannotated_class_is_an_error():
    logits, target, annotated = partial_problem()
    target[0, 3, 0, 0] = 2  # class 2 is not drawn in sample 0
    for partial in ("exclude", "marginal"):
        with pytest.raises(ValueError, match="sample 0 contains class 2"):
            SegmentationLoss(partial=partial)(logits, target, annotated)


def test_unannotated_class_under_ignore_is_fine():
    logits, target, annotated = partial_problem()
    target[0, 3] = IGNORE
    assert torch.isfinite(SegmentationLoss()(logits, target, annotated))


@pytest.mark.parametrize(
    ("target_shape", "annotated_shape", "message"),
    [
        ((2, 4, 5, 5), (2, 3), "target shape"),
        ((2, 2, 4, 5, 6), (2, 3), "target shape"),
        ((1, 4, 5, 6), (2, 3), "target shape"),
        ((2, 4, 5, 6), (2, 4), "annotated shape"),
        ((2, 4, 5, 6), (3,), "annotated shape"),
    ],
)
def test_mismatched_shapes_are_errors(target_shape, annotated_shape, message):
    logits = torch.randn(2, 3, 4, 5, 6)
    target = torch.zeros(target_shape, dtype=torch.long)
    annotated = torch.ones(annotated_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        SegmentationLoss()(logits, target, annotated)


def test_bad_values_and_settings_are_errors():
    logits, target = random_problem(c=3)
    target[0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"in \[0, 3\) or IGNORE"):
        SegmentationLoss()(logits, target)
    with pytest.raises(ValueError, match="integer channel indices"):
        SegmentationLoss()(logits, target.float())
    with pytest.raises(ValueError, match="bool tensor"):
        SegmentationLoss()(logits, target.clamp(max=2), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        SegmentationLoss(class_weights=[1.0, 1.0])(logits, target.clamp(max=2))
    with pytest.raises(ValueError, match="partial must be one of"):
        SegmentationLoss(partial="ignore")
    with pytest.raises(ValueError, match="smooth must be > 0"):
        SegmentationLoss(smooth=0.0)
    with pytest.raises(ValueError, match="class_weights must be finite"):
        SegmentationLoss(class_weights=[1.0, -1.0])


# --- precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", ["exclude", "marginal"])
def test_float16_logits_give_a_finite_float32_loss(partial):
    logits, target, annotated = partial_problem()
    half = logits.half().requires_grad_(True)
    criterion = SegmentationLoss(partial=partial)
    loss = criterion(half, target, annotated)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = criterion(half.detach().float(), target, annotated)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert half.grad.dtype == torch.float16 and torch.all(torch.isfinite(half.grad))


def test_loss_under_autocast_is_float32():
    logits, target = random_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SegmentationLoss()(logits.bfloat16(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- dice_per_class --------------------------------------------------------------------------


def test_dice_per_class_known_values():
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 2]]])  # (Z, Y, X) = (1, 2, 4)
    prediction = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 0]]])
    dice = dice_per_class(prediction, target, num_classes=4)
    assert dice.shape == (4,) and dice.dtype == torch.float64
    # class 0: overlap 2, sizes 3 + 4; class 1: overlap 2, sizes 2 + 3; class 2: 1, 3 + 1.
    assert dice[:3].tolist() == pytest.approx([4 / 7, 4 / 5, 2 / 4])
    assert math.isnan(dice[3].item())  # class 3 is in neither map


def test_dice_per_class_pools_a_batch_and_skips_ignored_voxels():
    target = torch.tensor([[[[1, 1, 0]]], [[[0, 1, IGNORE]]]])  # (N, Z, Y, X) = (2, 1, 1, 3)
    prediction = torch.tensor([[[[1, 0, 0]]], [[[0, 1, 1]]]])
    dice = dice_per_class(prediction, target, num_classes=2)
    # Scored voxels (target, prediction): (1,1) (1,0) (0,0) (0,0) (1,1).
    assert dice.tolist() == pytest.approx([2 * 2 / (3 + 2), 2 * 2 / (2 + 3)])
    perfect = dice_per_class(target.clamp(min=0), target.clamp(min=0), num_classes=3)
    assert perfect[:2].tolist() == [1.0, 1.0] and math.isnan(perfect[2].item())


def test_dice_per_class_errors():
    labels = torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="share"):
        dice_per_class(labels, labels[:1], 2)
    with pytest.raises(ValueError, match=r"prediction labels must be in \[0, 2\)"):
        dice_per_class(labels + 2, labels, 2)
    with pytest.raises(ValueError, match="integer labels"):
        dice_per_class(labels.float(), labels, 2)
