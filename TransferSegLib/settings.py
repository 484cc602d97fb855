"""Training settings: :class:`TrainConfig`, defined once (no torch needed).

Each field carries its help text in its metadata. The command line's training flags
(:mod:`TransferSegLib.cli`), the options a finetune job accepts (:mod:`TransferSegLib.jobs`)
and the trainer (:mod:`TransferSegLib.training`) all read them from here. A field whose
metadata has ``cli=False`` is a job and library option only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from TransferSegLib.errors import InputError

# What fine-tuning does with the base's labels the new model does not learn (context.py).
BASE_LABEL_MODES = ("drop", "context", "keep")


def _setting(default, help: str, cli: bool = True, **extra):
    return field(default=default, metadata={"help": help, "cli": cli, **extra})


@dataclass
class TrainConfig:
    """How to train. Steps count optimiser updates; one step sees ``batch_size`` patches."""

    steps: int = _setting(500, "optimiser steps", minimum=1)
    batch_size: int = _setting(2, "patches per step", minimum=1)
    lr: float | None = _setting(None, "learning rate (default: the strategy's own, see the "
                                "README)")
    weight_decay: float = _setting(1e-5, "AdamW weight decay", cli=False)
    optimizer: str = _setting("adamw", "adamw, or sgd (momentum 0.99, nesterov, as nnU-Net)",
                              choices=("adamw", "sgd"))
    val_every: int = _setting(50, "steps between validations", minimum=1)
    patience: int = _setting(0, "validations without improvement before stopping (0: never)",
                             minimum=0)
    checkpoint_every: int = _setting(50, "steps between resumable checkpoints", minimum=1)
    foreground_ratio: float = _setting(0.67, "share of patches centred on an annotated "
                                       "foreground voxel", cli=False)
    augment: bool = _setting(True, "data augmentation")
    # Mirroring swaps left and right: with few cases it teaches the spleen where the liver is.
    mirror: bool = _setting(False, "also random flips (off by default: they swap left and right)")
    # One or a few training scans: a new patient is another size and tilt. Measured on the CT
    # targets of bench/transfer.py, it raised scratch and the default transfer alike.
    spatial: bool = _setting(True, "random rotation (up to 15 degrees about each axis) and "
                             "scaling (0.85 to 1.15) of 3 in 10 patches")
    # Contrast enhancement brightens whole organs by 40-60 HU; a model tuned on one plain CT
    # took a contrast-enhanced liver for muscle. Measured on bench/transfer.py's CT targets, it
    # raised the default transfer on the back muscles from 0.42 to 0.66 (scratch 0.28 to 0.33);
    # on the organs both stayed within their spread (bench/README.md).
    intensity_field: bool = _setting(True, "smooth random intensity fields over half the "
                                     "patches (MONAI RandBiasField, degree 3)")
    # A new label channel starting as likely as any other is first pushed down everywhere; with
    # the head ten times faster than the body (the default strategy) an organ then stayed at
    # Dice 0 on its own training scan for 75 to all 150 steps at four seeds of five. Started
    # at its share of the training voxels, every organ passed 0.5 by step 50 (bench/README.md).
    prior_bias: bool = _setting(True, "start for new label channels at their share of the "
                                "training voxels (their output bias)")
    # One abdominal training scan: on a scan of the chest and neck too, the liver was also
    # found in the heart and the shoulders, apart from the organ (bench/README.md).
    largest_component: bool = _setting(
        True, "segmentations keep only the largest piece of each label that is one piece in "
        "every training scan")
    # A model fine-tuned on one scan names what it never saw after what it resembles: the
    # heart of a chest above an abdominal training scan became liver (bench/README.md).
    base_labels: str = _setting(
        "drop", "the base's other labels: drop them, or learn them from the base's own "
        "predictions on the training scans as context (written as background) or keep "
        "(segmented too)", choices=BASE_LABEL_MODES, transfer=True)
    seed: int = _setting(0, "seed of patches, augmentation and new weights")
    device: str = _setting("auto", "auto (CUDA > MPS > CPU), cpu, cuda")
    amp: bool = _setting(True, "mixed precision (CUDA only)", cli=False)
    cache_gb: float = _setting(8.0, "RAM for preprocessed cases; the rest are re-read",
                               cli=False, minimum=0)
    val_overlap: float = _setting(0.25, "sliding-window overlap of validation", cli=False)
    head_lr_factor: float | None = _setting(
        None, "learning-rate factor of the head and new label channels (default: the "
        "strategy's; discriminative 10)", transfer=True, minimum=0)
    freeze_depth: int | None = _setting(
        None, "finetune, two-stage: freeze only this many encoder blocks (default: the whole "
        "encoder)", transfer=True, minimum=0)
    warmup: int | None = _setting(None, "steps of linear learning-rate warm-up (default: the "
                                  "strategy's)", minimum=0)
    threads: int | None = _setting(None, "CPU threads (default: the cores other programs "
                                   "leave idle)", minimum=1)

    def __post_init__(self) -> None:
        for item in fields(self):  # the bounds in the fields' metadata, named as on the CLI
            value, minimum = getattr(self, item.name), item.metadata.get("minimum")
            if minimum is not None and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))
                    or not value >= minimum):
                raise InputError(f"--{item.name.replace('_', '-')} must be a number of at least "
                                 f"{minimum}, not {value!r}.")
        if self.optimizer not in ("adamw", "sgd"):
            raise InputError(f"Unknown optimiser {self.optimizer!r}; use adamw or sgd.")
        if self.base_labels not in BASE_LABEL_MODES:
            raise InputError(f"Unknown --base-labels {self.base_labels!r}; use drop, context "
                             "or keep.")
        if not 0 <= self.foreground_ratio <= 1:
            raise InputError("The foreground ratio must lie between 0 and 1.")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"The learning rate must be a positive number, not {self.lr}.")

    def for_strategy(self, strategy: str) -> TrainConfig:
        """This configuration with the strategy's defaults filled in where a value is None."""
        from TransferSegLib.strategies import defaults

        chosen = defaults(strategy)
        return replace(
            self, lr=chosen["lr"] if self.lr is None else self.lr,
            head_lr_factor=(chosen["head_lr_factor"] if self.head_lr_factor is None
                            else self.head_lr_factor),
            warmup=int(chosen["warmup"]) if self.warmup is None else self.warmup)


_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def json_types() -> dict[str, tuple[type, ...]]:
    """Each setting's accepted JSON types (a job's options): from the field's annotation."""
    found = {}
    for item in fields(TrainConfig):
        kinds = [part.strip() for part in str(item.type).split("|")]
        found[item.name] = tuple(t for kind in kinds if kind != "None"
                                 for t in _JSON_TYPES[kind]) + (
            (type(None),) if "None" in kinds else ())
    return found


def command_line_settings(transfer: bool = True):
    """The fields the command line offers as flags (``--batch-size`` for ``batch_size``);
    without ``transfer``, not those that only a transfer from a base uses."""
    return [item for item in fields(TrainConfig) if item.metadata.get("cli", True)
            and (transfer or not item.metadata.get("transfer"))]
