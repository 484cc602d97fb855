"""The transfer strategies by name and their default training settings (no torch needed).

One tuple used by the command line, the job format and the Slicer module. What each strategy
does is in :mod:`TransferSegLib.transfer`.
"""

from __future__ import annotations

from TransferSegLib.errors import InputError

STRATEGIES = ("scratch", "vanilla", "finetune", "finetune-last", "discriminative", "two-stage")

# The base model offered first: the CT base that ships with TransferSeg (Resources/Models/).
DEFAULT_BASE = "transferseg-ct-base-v5"

# The strategy used unless the user picks one (command line, jobs, Slicer module): Med3D's
# recipe, every layer trained and the new head faster. From the shipped base (v5) with one
# training CT it beat scratch by +0.21 mean Dice on liver, spleen and stomach and +0.10 on the
# back muscles, five seeds each (vanilla: +0.25, +0.10; finetune: +0.16, -0.00), and it led
# vanilla on the seeds the rates were chosen on (bench/README.md, bench/rates.py). On a third
# patient's CT, framed unlike the training CT and used for no choice, the gains were small:
# +0.02 and +0.03 (vanilla +0.06, -0.04; finetune +0.03, -0.04; bench/README.md, "One piece").
DEFAULT_STRATEGY = "discriminative"

# Each strategy's own learning rate, the head's rate as a factor of it, and linear warm-up
# steps, chosen by the controlled runs in bench/README.md: a transferred network wants a
# different rate from one trained from scratch, and scratch, the control, gets its own best.
# scratch, vanilla, finetune and discriminative: each the best of a grid of rates, by the mean
# over both CT targets at seeds other than the reported ones (bench/rates.py). finetune-last and
# two-stage were not measured again.
DEFAULTS: dict[str, dict[str, float]] = {
    "scratch": {"lr": 3e-3, "head_lr_factor": 1.0, "warmup": 0},
    "vanilla": {"lr": 3e-3, "head_lr_factor": 1.0, "warmup": 0},
    "finetune": {"lr": 3e-2, "head_lr_factor": 1.0, "warmup": 0},
    "finetune-last": {"lr": 3e-3, "head_lr_factor": 1.0, "warmup": 0},
    "discriminative": {"lr": 1e-2, "head_lr_factor": 10.0, "warmup": 0},
    "two-stage": {"lr": 3e-3, "head_lr_factor": 1.0, "warmup": 0},
}


def defaults(strategy: str) -> dict[str, float]:
    """The learning rate, head learning-rate factor and warm-up steps ``strategy`` uses unless
    told otherwise (see :data:`DEFAULTS`)."""
    if strategy not in DEFAULTS:
        raise InputError(
            f"Unknown transfer strategy {strategy!r}; known: {', '.join(STRATEGIES)}."
        )
    return dict(DEFAULTS[strategy])
