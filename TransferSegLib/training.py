"""The training loop: patches from cached cases, augmentation, validation, checkpoints, events.

Read :func:`train` top to bottom: it is the whole loop. Everything random at step ``s`` is
drawn from generators seeded by ``(seed, s, rank)``, so a run resumed from a checkpoint at step
``s`` continues exactly as the uninterrupted run would (on CPU, bit for bit), with no generator
state to save. The learning rate is a function of the step (polynomial decay), for the same
reason. A training state file (one safetensors file: weights, optimiser tensors, JSON metadata)
is written atomically every ``checkpoint_every`` steps and when cancelled.

Events are dicts handed to ``events`` (the CLI prints them as JSON lines or drives a progress
bar): ``start``, ``step``, ``validation``, ``stage``, ``checkpoint``, ``done``, ``cancelled``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from TransferSegLib import preprocess
from TransferSegLib.checkpoint import ModelCard, save_model
from TransferSegLib.datasets import Case, LabelTable
from TransferSegLib.errors import InputError, ModelFileError, TransferSegError
from TransferSegLib.files import atomic_output, pid_alive, remove_stale_partials, write_error
from TransferSegLib.losses import IGNORE  # target of padding voxels: not in the loss
from TransferSegLib.process import STOP_SIGNALS

Events = Callable[[dict], None]


@dataclass
class TrainConfig:
    """How to train. Steps count optimiser updates; one step sees ``batch_size`` patches."""

    steps: int = 500
    batch_size: int = 2
    lr: float | None = None  # None: the strategy's own (strategies.DEFAULTS)
    weight_decay: float = 1e-5
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.99, nesterov, as nnU-Net)
    val_every: int = 50
    patience: int = 0  # validation rounds without improvement before stopping; 0 = never
    checkpoint_every: int = 50
    foreground_ratio: float = 0.67  # share of patches centred on an annotated foreground voxel
    augment: bool = True
    # Mirroring swaps left and right: with few cases it teaches the spleen where the liver is.
    mirror: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision, CUDA only
    cache_gb: float = 8.0  # RAM for preprocessed cases; the rest are re-read when needed
    val_overlap: float = 0.25
    head_lr_factor: float | None = None  # None: the strategy's own (strategies.DEFAULTS)
    freeze_depth: int | None = None
    warmup: int | None = None  # steps of linear learning-rate warm-up; None: the strategy's
    threads: int | None = None  # CPU threads for torch; None: the idle cores (choose_threads)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise InputError("steps, batch size and validation interval must be at least 1.")
        if self.optimizer not in ("adamw", "sgd"):
            raise InputError(f"Unknown optimiser {self.optimizer!r}; use adamw or sgd.")
        if not 0 <= self.foreground_ratio <= 1:
            raise InputError("The foreground ratio must lie between 0 and 1.")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"The learning rate must be a positive number, not {self.lr}.")
        if self.warmup is not None and self.warmup < 0:
            raise InputError(f"Warm-up steps must be 0 or more, not {self.warmup}.")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"Threads must be at least 1, not {self.threads}.")

    def for_strategy(self, strategy: str) -> TrainConfig:
        """This configuration with the strategy's defaults filled in where a value is None."""
        from TransferSegLib.strategies import defaults

        chosen = defaults(strategy)
        return replace(
            self, lr=chosen["lr"] if self.lr is None else self.lr,
            head_lr_factor=(chosen["head_lr_factor"] if self.head_lr_factor is None
                            else self.head_lr_factor),
            warmup=int(chosen["warmup"]) if self.warmup is None else self.warmup)


def choose_threads(requested: int | None = None) -> int:
    """CPU threads for torch: ``requested``, else the cores not busy with other work.

    torch starts one thread per core; when another program keeps a core busy, its threads wait
    for each other at every operation and a step can take several times as long (on two busy
    cores one thread has run a step 5x faster than two). The 1-minute load average before
    training starts counts the busy cores.
    """
    if requested:
        return int(requested)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cores, torch.get_num_threads(), cores - busy))


# ------------------------------------------------------------------------------------- the data
@dataclass
class PreparedCase:
    """A case in model space: image (C, Z, Y, X) float32, target (Z, Y, X) int16 of channel
    indices, the channels annotated in it (bool, (out_channels,)), and its foreground voxels
    per channel (flat indices), for class-balanced patch sampling."""

    name: str
    image: np.ndarray
    target: np.ndarray
    annotated: np.ndarray
    foreground: dict[int, np.ndarray]  # annotated channel -> flat indices of its voxels

    @property
    def nbytes(self) -> int:
        return (self.image.nbytes + self.target.nbytes
                + sum(v.nbytes for v in self.foreground.values()))


def channel_map(card: ModelCard, table: LabelTable, source: str,
                others_background: bool = False) -> dict[int, int]:
    """Dataset label value -> model output channel, matched by label name.

    Labels the model lacks are an error, or background with ``others_background`` (when the
    user chose to learn a subset of the dataset's labels).
    """
    channel_of = {name: channel for channel, name in card.labels.items()}
    mapping = {}
    for value, name in table.names.items():
        if value == table.ignore_value:
            mapping[value] = IGNORE
        elif name not in channel_of and others_background:
            mapping[value] = 0
        elif name not in channel_of:
            raise InputError(
                f"Label {name!r} (value {value}) of {source} is not among the model's labels "
                f"({', '.join(card.labels.values())}); add it with --labels or rename it."
            )
        else:
            mapping[value] = channel_of[name]
    return mapping


def prepare_case(case: Case, table: LabelTable, card: ModelCard,
                 others_background: bool = False) -> PreparedCase:
    """Read ``case``, take it to the model's space and map its labels to output channels.

    ``others_background``: labels the model does not have count as background. Voxels of the
    table's ``ignore`` label get the target :data:`IGNORE`: no loss, no validation score.
    """
    images, label = case.load(table)
    if len(images) != card.in_channels:
        raise InputError(
            f"Case {case.name} has {len(images)} image channel(s); the model takes "
            f"{card.in_channels}."
        )
    arrays, grid = [], None
    for image in images:
        array, grid = preprocess.to_model_space(image, card.spacing, card.normalisation,
                                                card.orientation)
        arrays.append(array)
    values = preprocess.label_to_model_space(label, grid)
    mapping = channel_map(card, table, str(case.label), others_background)
    lookup = np.zeros(int(values.max()) + 1, np.int16)
    for value, channel in mapping.items():
        if value < lookup.size:
            lookup[value] = channel
    target = lookup[values]
    annotated_names = case.annotated if case.annotated is not None else set(table.names.values())
    annotated = np.zeros(card.out_channels, bool)
    annotated[0] = True
    for name in annotated_names:
        if mapping[table.value(name)] != IGNORE:
            annotated[mapping[table.value(name)]] = True
    annotated[0] = True
    foreground = {int(c): np.flatnonzero(target == c) for c in np.unique(target)
                  if c > 0 and annotated[c]}
    return PreparedCase(case.name, np.stack(arrays), target, annotated, foreground)


class CaseCache:
    """Prepared cases kept in memory up to ``budget`` bytes (least recently used go first)."""

    def __init__(self, loader: Callable[[int], PreparedCase], count: int, budget: float):
        self.loader, self.count, self.budget = loader, count, budget
        self._cases: OrderedDict[int, PreparedCase] = OrderedDict()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> PreparedCase:
        if index in self._cases:
            self._cases.move_to_end(index)
            return self._cases[index]
        case = self.loader(index)
        self._cases[index] = case
        while len(self._cases) > 1 and sum(c.nbytes for c in self._cases.values()) > self.budget:
            self._cases.popitem(last=False)
        return case


def sample_patch(
    case: PreparedCase, patch: Sequence[int], rng: np.random.Generator, foreground: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A patch (C, *patch) and its target (*patch) from ``case``; ``patch`` is (Z, Y, X).

    Centred near a voxel of a random annotated foreground class when ``foreground`` (classes
    drawn with equal chance, so small organs are seen as often as large ones), else anywhere.
    Parts outside the volume are padded: image with its minimum, target IGNORE.
    """
    shape = np.array(case.target.shape)
    size = np.array(patch)
    if foreground and case.foreground:
        voxels = case.foreground[sorted(case.foreground)[rng.integers(len(case.foreground))]]
        centre = np.array(np.unravel_index(voxels[rng.integers(voxels.size)],
                                           case.target.shape))
        start = centre - size // 2 + rng.integers(-(size // 4), size // 4 + 1)
    else:
        start = np.array([rng.integers(min(0, s - p), max(0, s - p) + 1)
                          for s, p in zip(shape, size, strict=True)])
    start = np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
    image = np.full((case.image.shape[0], *size), case.image.min(), np.float32)
    target = np.full(tuple(size), IGNORE, np.int16)
    src = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, size, shape,
                                                                   strict=True))
    dst = tuple(slice(max(a, 0) - a, min(a + p, s) - a) for a, p, s in zip(start, size, shape,
                                                                            strict=True))
    image[(slice(None), *dst)] = case.image[(slice(None), *src)]
    target[dst] = case.target[src]
    return image, target


@functools.lru_cache(maxsize=2)
def _augmentations(mirror: bool):
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    flips = [RandFlipd(["image", "target"], prob=0.5, spatial_axis=axis) for axis in range(3)]
    return Compose([
        *(flips if mirror else []),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.2, std=0.02),
    ])


def augment(image: np.ndarray, target: np.ndarray, rng: np.random.Generator,
            mirror: bool = False):
    """Intensity scale and shift, Gaussian noise and, with ``mirror``, random flips on each
    axis (MONAI transforms).

    The transforms are reseeded from ``rng`` on every call, so a step's augmentation depends
    only on the step's seed (what makes resuming exact).
    """
    transforms = _augmentations(mirror)
    transforms.set_random_state(seed=int(rng.integers(2**31)))
    out = transforms({"image": image, "target": target[None]})
    return np.asarray(out["image"], np.float32), np.asarray(out["target"][0], np.int16)


# ------------------------------------------------------------------------------ state on disk
def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               meta: dict) -> None:
    """One file holding weights, optimiser tensors and JSON metadata; written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone()
               for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, values in opt["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous().clone()
    meta = dict(meta, param_groups=opt["param_groups"])
    with atomic_output(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"transferseg.state": json.dumps(meta)})


def read_state_meta(path: Path) -> dict:
    """The JSON metadata of a training state file, without its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return json.loads(handle.metadata()["transferseg.state"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise ModelFileError(
            f"Training state {path} is unreadable ({error}); start again without --resume."
        ) from None


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_state` wrote; returns its metadata."""
    meta = read_state_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ModelFileError(
            f"Training state {path} is unreadable ({error}); start again without --resume."
        ) from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


# ---------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """What a training run produced: model file, status, steps, best validation Dice, curve."""

    model: Path
    status: str  # "done", "stopped early", "cancelled"
    steps: int
    best_dice: float | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class Cancellation:
    """Cancel on SIGTERM/SIGINT (SIGBREAK on Windows) or when ``cancel_file`` appears;
    checked once per step."""

    def __init__(self, cancel_file: Path | None = None):
        self.cancel_file = cancel_file
        self.flag = False
        self._previous = {}

    def __enter__(self) -> Cancellation:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread: rely on the cancel file
                pass
        return self

    def _set(self, *_: object) -> None:
        self.flag = True

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.flag or bool(self.cancel_file and self.cancel_file.exists())


def poly_lr(base: float, step: int, steps: int, warmup: int = 0) -> float:
    """nnU-Net's polynomial decay, base * (1 - step / steps) ** 0.9, after ``warmup`` steps of
    linear warm-up (step ``s < warmup`` gets ``(s + 1) / warmup`` of that)."""
    rate = base * (1 - step / steps) ** 0.9
    return rate * (step + 1) / warmup if step < warmup else rate


def make_optimizer(param_groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    if config.lr is None:  # a config not yet resolved for a strategy: scratch's own rate
        from TransferSegLib.strategies import defaults

        config = replace(config, lr=defaults("scratch")["lr"])
    lr = config.lr
    groups = [dict(g, initial_lr=g.get("lr", lr)) for g in param_groups]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


def validate(model: torch.nn.Module, cases: Sequence[PreparedCase], card: ModelCard,
             device: torch.device, overlap: float) -> dict[str, float]:
    """Mean Dice per label name over ``cases`` (each label only where it is annotated)."""
    from TransferSegLib import networks
    from TransferSegLib.inference import argmax_channels, predict_logits
    from TransferSegLib.tiling import predict_logits_valid

    patch = tuple(int(v) for v in reversed(card.patch_size))
    valid_output = networks.output_size(card.architecture, card.arguments, patch)
    sums: dict[int, list[float]] = {}
    for case in cases:
        if valid_output:
            logits = predict_logits_valid(model, case.image, patch, valid_output, device=device,
                                          out_channels=card.out_channels)
        else:
            logits = predict_logits(model, case.image, patch, device=device,
                                    out_channels=card.out_channels, overlap=overlap)
        prediction = argmax_channels(logits.numpy(), card.out_channels)
        scored = case.target != IGNORE  # ignored voxels count neither way
        for channel in range(1, card.out_channels):
            if not case.annotated[channel]:
                continue
            ref, out = case.target == channel, (prediction == channel) & scored
            if ref.any() or out.any():
                dice = 2 * np.logical_and(ref, out).sum() / (ref.sum() + out.sum())
                sums.setdefault(channel, []).append(float(dice))
    return {card.labels[c]: float(np.mean(v)) for c, v in sorted(sums.items())}


def train(
    plan,
    card: ModelCard,
    train_cases: CaseCache | Sequence[PreparedCase],
    val_cases: Sequence[PreparedCase],
    config: TrainConfig,
    out_dir: Path,
    events: Events = lambda event: None,
    resume: bool = False,
    cancel_file: Path | None = None,
    cards: Sequence[ModelCard] | None = None,
    heads: tuple[Sequence[int], Sequence[int]] | None = None,
) -> TrainResult:
    """Train ``plan.model`` (a :class:`~TransferSegLib.transfer.TransferPlan`) and write it.

    Writes into ``out_dir``: ``model.safetensors`` (best validation Dice, or last when there is
    no validation), ``last.safetensors``, ``state.safetensors`` (for ``resume``) and
    ``progress.jsonl`` (every event).

    Multi-head co-training (``plan.model`` a :class:`~TransferSegLib.transfer.MultiHeadNetwork`):
    ``cards[k]`` describes head ``k`` and ``heads`` gives the head of each training and
    validation case. Each step draws a head, then a batch from that head's cases. Besides
    ``model.safetensors``/``last.safetensors`` (head 0), every head is written as its own model
    file, ``model-<k>-<name>.safetensors``; any of them is a base model for fine-tuning.
    """
    from TransferSegLib import distributed, resources, transfer
    from TransferSegLib.inference import out_of_memory, select_device
    from TransferSegLib.losses import SegmentationLoss

    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.device(select_device(config.device))
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(config.threads))
    resources.reset(device)
    model = plan.model.to(device)
    multi = isinstance(model, transfer.MultiHeadNetwork)
    if multi:
        if not cards or heads is None or len(cards) != len(model.heads):
            raise TransferSegError("A multi-head network needs one card per head; this is a bug.")
        by_head = [[i for i, h in enumerate(heads[0]) if h == k] for k in range(len(cards))]
        live_heads = [k for k, members in enumerate(by_head) if members]
        model.select(0)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(plan.param_groups, config)
    loss_fn = SegmentationLoss()
    state_path, log_path = out_dir / "state.safetensors", out_dir / "progress.jsonl"
    patch = tuple(int(v) for v in reversed(card.patch_size))
    # Valid-convolution networks predict only the centre of a patch: the target is cropped.
    from TransferSegLib import networks

    valid_output = networks.output_size(card.architecture, card.arguments, patch)
    crop = (slice(None), slice(None)) + tuple(
        slice((n - o) // 2, (n - o) // 2 + o) for n, o in zip(patch, valid_output, strict=True)
    ) if valid_output else (slice(None),)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    meta = {"step": 0, "best": None, "bad_rounds": 0, "stage": 1, "history": []}
    if resume:
        if not state_path.exists():
            raise InputError(f"Nothing to resume in {out_dir}: it has no state.safetensors.")
        if read_state_meta(state_path).get("stage") == 2:
            transfer.unfreeze_all(model, plan)  # the optimiser must see the second stage's
            optimizer = make_optimizer(plan.param_groups, config)
        meta = load_state(state_path, model, optimizer)
    wrapped = distributed.wrap(model, device, find_unused=multi)

    def emit(event: dict) -> None:
        if rank != 0:
            return
        event = {"event": event.pop("event"), "time": round(time.time(), 3), **event}
        try:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(event) + "\n")
        except OSError as error:
            raise write_error(log_path, error) from error
        events(event)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    emit({"event": "start", "strategy": plan.strategy, "device": str(device), "world": world,
          "threads": torch.get_num_threads() if device.type == "cpu" else None,
          "lr": config.lr, "head_lr_factor": config.head_lr_factor, "warmup": config.warmup,
          "steps": config.steps, "from_step": meta["step"], "cases": len(train_cases),
          "validation_cases": len(val_cases), "report": plan.report})
    warning = resources.memory_warning(card.metrics, card.patch_size, config.batch_size, device)
    if warning:
        emit({"event": "message", "message": warning})

    start_time, status = time.perf_counter(), "done"
    first_step = meta["step"]
    with Cancellation(cancel_file) as cancel:
        for step in range(first_step, config.steps):
            rng = np.random.default_rng([config.seed, step, rank])
            torch.manual_seed(int(rng.integers(2**62)))
            images, targets, annotated = [], [], []
            pool = range(len(train_cases))
            if multi:
                head_index = live_heads[int(rng.integers(len(live_heads)))]
                model.select(head_index)
                pool = by_head[head_index]
            for _ in range(config.batch_size):
                case = train_cases[pool[int(rng.integers(len(pool)))]]
                image, target = sample_patch(case, patch, rng,
                                             rng.random() < config.foreground_ratio)
                if config.augment:
                    image, target = augment(image, target, rng, config.mirror)
                images.append(image)
                targets.append(target)
                annotated.append(case.annotated)
            x = torch.from_numpy(np.stack(images)).to(device)
            y = torch.from_numpy(np.stack(targets).astype(np.int64))[:, None][crop].to(device)
            mask = torch.from_numpy(np.stack(annotated)).to(device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], step, config.steps,
                                      config.warmup or 0)
            transfer.set_train_mode(model, plan)
            try:
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    loss = loss_fn(wrapped(x), y, mask)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            except (MemoryError, RuntimeError) as error:
                if not out_of_memory(error):
                    raise
                raise TransferSegError(_out_of_memory(device, config, card)) from None
            scaler.step(optimizer)
            scaler.update()
            meta["step"] = step + 1

            elapsed = time.perf_counter() - start_time
            done = step + 1 - first_step
            if rank == 0 and (step % 10 == 0 or step + 1 == config.steps):
                meta["resources"] = resources.peak(device)
                emit({"event": "step", "step": step + 1, "steps": config.steps,
                      "loss": round(loss.item(), 5), "lr": optimizer.param_groups[0]["lr"],
                      "patches_per_s": round(done * config.batch_size * world / elapsed, 2),
                      "eta_s": round(elapsed / done * (config.steps - step - 1), 1),
                      **meta["resources"]})

            decision = CONTINUE
            if val_cases and ((step + 1) % config.val_every == 0 or step + 1 == config.steps):
                if rank == 0:
                    decision = _validation_round(model, val_cases, card, device, config, meta,
                                                 plan, emit, out_dir, cards, heads)
                decision = distributed.broadcast_int(decision, device)
                if decision == UNFREEZE:
                    transfer.unfreeze_all(model, plan)
                    meta.update(stage=2, bad_rounds=0)
                    optimizer = make_optimizer(plan.param_groups, config)
                    wrapped = distributed.wrap(model, device)
                    emit({"event": "stage", "step": step + 1, "stage": 2,
                          "message": "validation Dice stopped improving: all layers unfrozen"})
            stop = decision == STOP
            cancelled = distributed.any_rank(cancel.requested, device)
            if rank == 0 and (cancelled or stop or (step + 1) % config.checkpoint_every == 0):
                if multi:
                    model.select(0)  # resume loads into the same head selection
                save_state(state_path, model, optimizer, meta)
                emit({"event": "checkpoint", "step": step + 1, "path": str(state_path)})
            if cancelled:
                status = "cancelled"
                break
            if stop:
                status = "stopped early"
                break

    last = out_dir / "last.safetensors"
    best = out_dir / "model.safetensors"
    if rank == 0:
        meta["resources"] = resources.peak(device)
        model.cpu()
        _save_models(last, model, card, cards, meta, config)
        if meta["best"] is None or not best.exists():
            _save_models(best, model, card, cards, meta, config)
        seconds = time.perf_counter() - start_time
        emit({"event": "cancelled" if status == "cancelled" else "done", "status": status,
              "model": str(best), "last": str(last), "step": meta["step"],
              "best_dice": meta["best"], "seconds": round(seconds, 1), **meta["resources"]})
    distributed.barrier()
    return TrainResult(best, status, meta["step"], meta["best"], meta["history"],
                       time.perf_counter() - start_time)


def _out_of_memory(device: torch.device, config: TrainConfig, card: ModelCard) -> str:
    """What to change when a training step does not fit in GPU (or CPU) memory."""
    patch = " x ".join(map(str, card.patch_size))
    if config.batch_size > 1:
        advice = f"use --batch-size {config.batch_size // 2}"
    else:
        smaller = " ".join(str(max(16, p // 2 // 16 * 16)) for p in card.patch_size)
        advice = f"use a smaller patch (e.g. --patch {smaller} for a new model)" + (
            " or --device cpu" if device.type != "cpu" else "")
    where = f"The GPU ({device})" if device.type != "cpu" else "The computer"
    return (f"{where} ran out of memory training on batches of {config.batch_size} "
            f"patches of {patch} voxels; {advice}.")


CONTINUE, STOP, UNFREEZE = 0, 1, 2


def _multi_head_scores(model, val_cases, cards, heads, device, overlap) -> dict[str, float]:
    """Validation Dice of every head on its own cases, labels named ``<head>: <label>``."""
    scores = {}
    for k, head_card in enumerate(cards):
        cases = [c for c, h in zip(val_cases, heads[1], strict=True) if h == k]
        if cases:
            model.select(k)
            name = head_card.lineage[-1].get("head", str(k))
            scores.update({f"{name}: {label}": dice for label, dice in
                           validate(model, cases, head_card, device, overlap).items()})
    model.select(0)
    return scores


def _save_models(path: Path, model, card: ModelCard, cards, meta: dict,
                 config: TrainConfig) -> None:
    """Write ``model`` to ``path``; a multi-head network also as one file per head."""
    from TransferSegLib.transfer import MultiHeadNetwork

    if not isinstance(model, MultiHeadNetwork):
        save_model(path, model, _card_with(card, meta, config), overwrite=True)
        return
    for k, head_card in enumerate(cards):
        name = head_card.lineage[-1].get("head", str(k))
        head_path = path.with_name(f"{path.stem}-{k}-{name}.safetensors")
        save_model(head_path, model.network(k), _card_with(head_card, meta, config),
                   overwrite=True)
    save_model(path, model.network(0), _card_with(cards[0], meta, config), overwrite=True)


def _validation_round(model, val_cases, card, device, config, meta, plan, emit,
                      out_dir, cards=None, heads=None) -> int:
    """Score, keep the best model, and decide: CONTINUE, STOP early, or UNFREEZE (two-stage)."""
    if cards:
        scores = _multi_head_scores(model, val_cases, cards, heads, device, config.val_overlap)
    else:
        scores = validate(model, val_cases, card, device, config.val_overlap)
    mean = float(np.mean(list(scores.values()))) if scores else 0.0
    improved = meta["best"] is None or mean > meta["best"] + 1e-4
    meta["history"].append({"step": meta["step"], "dice": mean, "labels": scores})
    if improved:
        meta["best"], meta["bad_rounds"] = mean, 0
        _save_models(out_dir / "model.safetensors", model, card, cards, meta, config)
    else:
        meta["bad_rounds"] += 1
    emit({"event": "validation", "step": meta["step"], "dice": round(mean, 5),
          "labels": {k: round(v, 5) for k, v in scores.items()}, "best": meta["best"],
          "improved": improved})
    if config.patience and meta["bad_rounds"] >= config.patience:
        return UNFREEZE if plan.strategy == "two-stage" and meta["stage"] == 1 else STOP
    return CONTINUE


def _card_with(card: ModelCard, meta: dict, config: TrainConfig) -> ModelCard:
    data = asdict(card)
    data["metrics"] = dict(card.metrics, validation_dice=meta["best"], steps=meta["step"],
                           history=meta["history"][-20:])
    used = meta.get("resources", {})
    if "gpu_peak_gb" in used:  # what the next run of this model will need (resources.py)
        data["metrics"].update(train_gpu_peak_gb=used["gpu_peak_gb"],
                               train_batch_size=config.batch_size,
                               train_patch_size=list(card.patch_size))
    data["lineage"] = list(card.lineage)
    return ModelCard(**data)


# ---------------------------------------------------------------------------- whole training jobs
@dataclass
class LabelledCase:
    """A case with the label table of the dataset it came from (datasets differ in labels)."""

    case: Case
    table: LabelTable
    others_background: bool = False  # labels the model lacks are background (a chosen subset)
    head: int = 0  # which output head trains on it (multi-domain co-training)


def split_cases(cases: list, seed: int, fraction: float = 0.2) -> tuple[list, list, bool]:
    """Training and validation cases; with fewer than 3 cases validation reuses training.

    Returns (train, validation, held_out) where ``held_out`` says whether validation cases
    are separate from training ones.
    """
    if len(cases) < 3:
        return cases, cases, False
    order = np.random.default_rng(seed).permutation(len(cases))
    count = max(1, round(len(cases) * fraction))
    val = [cases[i] for i in sorted(order[:count])]
    train = [cases[i] for i in sorted(order[count:])]
    return train, val, True


class OutputLock:
    """An exclusive claim on an output folder, so two jobs never write into the same one.

    The lock file holds the owner's process id and computer name. A lock left by a process
    that no longer exists on this computer (killed, crashed) is taken over; its id is then in
    ``stale_pid``.
    """

    def __init__(self, folder: Path):
        self.path = folder / ".transferseg.lock"
        self.stale_pid: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if not self._take_over_stale():
                    raise TransferSegError(
                        f"Another TransferSeg job is writing to {self.path.parent} (if none "
                        f"is, delete {self.path.name} there); choose another output folder."
                    ) from None
        else:
            raise TransferSegError(f"Another TransferSeg job took {self.path.parent} just now; "
                                   "choose another output folder.")
        os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n".encode())
        os.close(fd)
        return self

    def _take_over_stale(self) -> bool:
        """Remove the lock if its process is gone; False if it is (or may be) alive."""
        try:
            text = self.path.read_text(errors="replace", encoding="utf-8")
        except FileNotFoundError:
            return True  # released meanwhile: try again
        except OSError:
            return False
        fields = text.split()
        if not fields or not fields[0].isdigit():
            return False
        if len(fields) > 1 and fields[1] != socket.gethostname():
            return False  # a process on another computer: no way to tell
        pid = int(fields[0])
        if pid_alive(pid):
            return False
        # Move it aside first: of two jobs taking over at once only one can, and a live lock
        # written meanwhile by the other is put back.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        if aside.read_text(errors="replace", encoding="utf-8") != text:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self.stale_pid = pid
        return True

    def __exit__(self, *_: object) -> None:
        self.path.unlink(missing_ok=True)


def _check_output(out_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume or overwrite:
        return
    if (out_dir / "model.safetensors").exists() or (out_dir / "state.safetensors").exists():
        raise TransferSegError(
            f"{out_dir} already holds a trained model; pass --resume to continue it, "
            "--overwrite to start again, or choose another --out folder."
        )


def run_job(
    plan,
    card: ModelCard,
    cases: list[LabelledCase],
    val_cases: list[LabelledCase],
    config: TrainConfig,
    out_dir: Path,
    events: Events,
    resume: bool = False,
    overwrite: bool = False,
    cancel_file: Path | None = None,
    cards: Sequence[ModelCard] | None = None,
) -> TrainResult:
    """Prepare cases (cached within the RAM budget) and train, holding the output folder.

    ``cards``: one card per output head of a multi-head network (each case's ``head`` picks
    its card, so its labels are mapped to that head's channels); None for one head.
    """
    from TransferSegLib import distributed

    out_dir = Path(out_dir)
    lock = OutputLock(out_dir) if distributed.rank() == 0 else None
    if lock:
        lock.__enter__()
    try:
        if lock:
            _check_output(out_dir, resume, overwrite)  # under the lock: no other job there
            if lock.stale_pid:
                events({"event": "message", "message": (
                    f"{out_dir} was locked by process {lock.stale_pid}, which no longer runs "
                    "(killed or crashed): taking the folder over")})
            for path in remove_stale_partials(out_dir):
                events({"event": "message", "message": f"removed {path.name}, an unfinished "
                        "file of the stopped process"})
        if overwrite and not resume and distributed.rank() == 0:
            for name in ("state.safetensors", "progress.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        def card_of(item: LabelledCase) -> ModelCard:
            return cards[item.head] if cards else card

        cache = CaseCache(lambda i: prepare_case(cases[i].case, cases[i].table,
                                                 card_of(cases[i]), cases[i].others_background),
                          len(cases), config.cache_gb * 2**30)
        # Validating on the training cases (fewer than 3): reuse their prepared arrays.
        index_of = {id(c): i for i, c in enumerate(cases)}
        validation = [cache[index_of[id(c)]] if id(c) in index_of else
                      prepare_case(c.case, c.table, card_of(c), c.others_background)
                      for c in val_cases]
        heads = ([c.head for c in cases], [c.head for c in val_cases]) if cards else None
        return train(plan, card, cache, validation, config, out_dir, events, resume,
                     cancel_file, cards=cards, heads=heads)
    finally:
        if lock:
            lock.__exit__()


def _labelled(dataset, source: str) -> list[LabelledCase]:
    cases = [LabelledCase(case, dataset.labels) for case in dataset.labelled()]
    if not cases:
        raise InputError(
            f"Dataset {source} has no labelled case; training needs at least one image with "
            "its label map."
        )
    return cases


def _median_spacing(cases: list[LabelledCase]) -> list[float]:
    """Median voxel size (mm, x y z) of the cases' first image channel."""
    from TransferSegLib.volumes import read_volume

    spacings = [read_volume(item.case.image).GetSpacing() for item in cases]
    return [float(v) for v in np.median(np.array(spacings), axis=0)]


def finetune(
    base: Path | None,
    data: Path,
    out_dir: Path,
    strategy: str = "finetune",
    config: TrainConfig | None = None,
    *,
    val_data: Path | None = None,
    labels: Sequence[str] | None = None,
    architecture: str | None = None,
    arguments: dict | None = None,
    patch_size: Sequence[int] | None = None,
    events: Events = lambda event: None,
    resume: bool = False,
    overwrite: bool = False,
    cancel_file: Path | None = None,
    terminology: Mapping[str, str] | None = None,
) -> TrainResult:
    """Make a model for the labels of ``data`` from the base model file ``base``.

    ``strategy`` is one of :data:`TransferSegLib.transfer.STRATEGIES`; ``scratch`` uses only
    the base model's architecture and settings (or ``architecture``/``arguments`` without a
    base). The new model's labels are the dataset's (or ``labels``, a subset, in that order).
    ``patch_size`` (voxels, x y z) replaces the base's training and inference patch, e.g. a
    smaller one to fit a published model's training into a small GPU or a CPU.
    ``terminology`` (label name -> Slicer ``TerminologyEntry``) goes into the new model's card
    beside the base's entries for the labels they share.
    """
    from TransferSegLib import datasets, transfer
    from TransferSegLib.checkpoint import load_model
    from TransferSegLib.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        raise InputError(
            f"Unknown transfer strategy {strategy!r}; known: {', '.join(STRATEGIES)}.")
    config = (config or TrainConfig()).for_strategy(strategy)
    events = _rank_zero(events)
    if strategy == "two-stage" and not config.patience:
        config = replace(config, patience=2)  # the second stage starts on a plateau
        events({"event": "message", "message": "two-stage: unfreezing after 2 validations "
                "without improvement (set --patience to change)"})
    dataset = datasets.discover(data)
    cases = _labelled(dataset, str(data))
    if val_data is not None:
        val_cases = _labelled(datasets.discover(val_data), str(val_data))
    else:
        cases, val_cases, _ = split_cases(cases, config.seed)
    names = list(labels) if labels else list(dataset.labels.foreground.values())
    unknown = [n for n in names if n not in dataset.labels.names.values()]
    if unknown:
        raise InputError(f"Labels {unknown} are not in dataset {data}; it has "
                         f"{list(dataset.labels.foreground.values())}.")
    target = {0: "background", **{i + 1: n for i, n in enumerate(names)}}
    if labels:  # a chosen subset: the dataset's other labels become background
        for item in (*cases, *val_cases):
            item.others_background = True
    if base is not None:
        base_model, base_card = load_model(base)
    elif strategy == "scratch" and architecture:
        base_model, base_card = None, None
    else:
        raise InputError(f"Strategy {strategy!r} needs a base model (--base MODEL).")
    in_channels = len(dataset.channels) or len(cases[0].case.images)
    spacing = _median_spacing(cases[:5])
    card = _target_card(base_card, target, dataset, in_channels, architecture, arguments,
                        cases, spacing, strategy, base, config)
    if patch_size is not None:
        card = replace(card, patch_size=_checked_patch(card, patch_size))
    if terminology:
        card = replace(card, terminology={**card.terminology, **{
            name: entry for name, entry in terminology.items()
            if name in card.labels.values() and entry}})
    ratio = max(s / m for s, m in zip(spacing, card.spacing, strict=True))
    if card.modality != (base_card.modality if base_card else card.modality):
        events({"event": "message", "message": (
            f"cross-modality transfer ({base_card.modality} base, {card.modality} data): "
            f"intensities normalised as {card.normalisation['kind']}")})
    if ratio > 2 or ratio < 0.5:
        events({"event": "message", "message": (
            f"the data's voxels ({' x '.join(f'{s:.2g}' for s in spacing)} mm) differ from "
            f"the model's ({' x '.join(f'{s:.2g}' for s in card.spacing)} mm): cases are "
            "resampled to the model's spacing")})
    plan = transfer.prepare(
        strategy, card.architecture, card.arguments, base_model, base_card, target,
        in_channels, lr=config.lr, head_lr_factor=config.head_lr_factor,
        freeze_depth=config.freeze_depth if strategy in ("finetune", "two-stage") else None,
        seed=config.seed,
    )
    if val_data is None and len(val_cases) and val_cases[0] is cases[0]:
        events({"event": "message", "message": "fewer than 3 labelled cases: validation "
                "uses the training cases"})
    return run_job(plan, card, cases, val_cases, config, out_dir, events, resume, overwrite,
                   cancel_file)


def _checked_patch(card: ModelCard, patch_size: Sequence[int]) -> list[int]:
    """``patch_size`` if the card's network accepts it, else a clear error."""
    from TransferSegLib import networks

    patch = [int(v) for v in patch_size]
    divisor = networks.patch_divisor(card.architecture, card.arguments)
    fixed = networks.fixed_input_size(card.architecture, card.arguments)
    if len(patch) != 3 or any(v < 1 or v % divisor for v in patch):
        raise InputError(f"The patch {patch} does not fit the {card.architecture}: give three "
                         f"sizes, each a multiple of {divisor}.")
    if fixed is not None and list(reversed(patch)) != fixed:
        raise InputError(f"The {card.architecture} only takes patches of "
                         f"{list(reversed(fixed))} voxels.")
    networks.output_size(card.architecture, card.arguments, patch)  # valid-conv: checks it
    return patch


def _rank_zero(events: Events) -> Events:
    """``events`` for rank 0 only: other ranks of a torchrun job stay silent."""
    from TransferSegLib import distributed

    return events if distributed.rank() == 0 else (lambda event: None)


def _modality(name: str) -> str:
    """'CT', 'MR' or '' (unknown), from the many spellings datasets use."""
    name = (name or "").strip().upper()
    return "MR" if name.startswith("MR") or name in ("T1", "T2", "FLAIR", "T1W", "T2W") \
        else "CT" if name.startswith("CT") else name


def _target_card(base_card, target, dataset, in_channels, architecture, arguments, cases,
                 spacing, strategy, base, config) -> ModelCard:
    from TransferSegLib import networks, resources
    from TransferSegLib.preprocess import default_normalisation

    value_of = {name: value for value, name in dataset.labels.names.items()}
    label_values = {name: value_of.get(name, channel) for channel, name in target.items()}
    if base_card is not None:
        data = asdict(base_card)
        data.update(labels=target, out_channels=len(target), label_values=label_values,
                    terminology={name: entry for name, entry in base_card.terminology.items()
                                 if name in target.values()},
                    in_channels=in_channels, metrics={  # the base's GPU need, until measured
                        k: v for k, v in base_card.metrics.items()
                        if k in resources.TRAINING_KEYS}, created=ModelCard.__dataclass_fields__[
                        "created"].default_factory())
        if _modality(dataset.modality) and _modality(dataset.modality) != _modality(
                base_card.modality):
            # Cross-modality transfer: the data's intensities follow their own recipe.
            data.update(modality=_modality(dataset.modality),
                        normalisation=default_normalisation(_modality(dataset.modality)))
        lineage = list(base_card.lineage)
    else:
        modality = dataset.modality or "CT"
        arguments = networks.resolve_kwargs(architecture, **(arguments or {}))
        data = dict(architecture=architecture, arguments=arguments, in_channels=in_channels,
                    out_channels=len(target), labels=target, label_values=label_values,
                    spacing=spacing, patch_size=[64, 64, 64],
                    normalisation=default_normalisation(modality), modality=modality)
        lineage = []
    lineage.append({"strategy": strategy, "base": str(base) if base else None,
                    "steps": config.steps, "data": str(dataset.source),
                    "freeze_depth": config.freeze_depth, "lr": config.lr,
                    "head_lr_factor": config.head_lr_factor, "warmup": config.warmup})
    data.update(lineage=lineage, training_cases=[c.case.name for c in cases])
    return ModelCard(**data)


def pretrain(
    data: Sequence[Path],
    out_dir: Path,
    config: TrainConfig | None = None,
    *,
    architecture: str = "unet",
    arguments: dict | None = None,
    spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] = (64, 64, 64),
    modality: str | None = None,
    heads: str = "shared",
    hold_out: bool = True,
    title: str = "",
    description: str = "",
    events: Events = lambda event: None,
    resume: bool = False,
    overwrite: bool = False,
    cancel_file: Path | None = None,
) -> TrainResult:
    """Train a base model on one or several datasets whose label sets differ.

    ``hold_out``: validate on 20% of each dataset's cases (with 3 or more); False validates on
    the training cases themselves (when every case is too precious to hold out). ``title`` and
    ``description`` go into the model card.

    ``heads="shared"`` (partial labels): one output head whose labels are the union of the
    datasets' label names; each case is annotated only for its own dataset's labels (or the
    CSV's ``annotated`` column), so an organ one dataset does not draw is never taught as
    background. ``heads="per-dataset"`` (Med3D's multi-domain co-training): a shared network
    with one output head per dataset, each trained on its own dataset's cases and labels only;
    every head is written as a model file (see :func:`train`).
    """
    from TransferSegLib import datasets, networks, transfer
    from TransferSegLib.preprocess import default_normalisation

    if heads not in ("shared", "per-dataset"):
        raise InputError(f"heads must be 'shared' or 'per-dataset', not {heads!r}.")
    config = (config or TrainConfig()).for_strategy("scratch")
    cases: list[LabelledCase] = []
    names: list[str] = []
    label_sets: list[dict[int, str]] = []
    head_names: list[str] = []
    for index, path in enumerate(data):
        dataset = datasets.discover(path)
        labelled = _labelled(dataset, str(path))
        for item in labelled:
            item.head = index if heads == "per-dataset" else 0
        cases += labelled
        names += [n for n in dataset.labels.foreground.values() if n not in names]
        label_sets.append({0: "background", **{i + 1: n for i, n in enumerate(
            dataset.labels.foreground.values())}})
        folder = Path(path) if Path(path).is_dir() else Path(path).parent  # a CSV: its folder
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.resolve().name).strip("-") or "data"
        head_names.append(stem if stem not in head_names else f"{stem}{index}")
        modality = modality or dataset.modality
    # Split per dataset, so every head keeps validation cases of its own.
    groups = [[c for c in cases if c.head == k] for k in range(max(c.head for c in cases) + 1)]
    splits = [split_cases(group, config.seed) if hold_out else (group, group, False)
              for group in groups]
    cases = [c for train_part, _, _ in splits for c in train_part]
    val_cases = [c for _, val_part, _ in splits for c in val_part]
    target = {0: "background", **{i + 1: n for i, n in enumerate(names)}}
    arguments = networks.resolve_kwargs(architecture, **(arguments or {}))
    modality = modality or "CT"
    card = ModelCard(
        architecture=architecture, arguments=arguments, in_channels=1,
        out_channels=len(target), labels=target,
        spacing=list(spacing) if spacing else _median_spacing(cases[:5]),
        patch_size=list(patch_size), normalisation=default_normalisation(modality),
        modality=modality, training_cases=[c.case.name for c in cases],
        lineage=[{"strategy": "pretrain", "data": [str(p) for p in data],
                  "steps": config.steps}],
        title=title, description=description,
    )
    if heads == "shared":
        plan = transfer.prepare("scratch", architecture, arguments, None, None, target, 1,
                                lr=config.lr, seed=config.seed)
        return run_job(plan, card, cases, val_cases, config, out_dir, events, resume,
                       overwrite, cancel_file)
    cards = []
    for k, (labels, name) in enumerate(zip(label_sets, head_names, strict=True)):
        head_card = asdict(card)
        head_card.update(labels=labels, out_channels=len(labels), label_values={},
                         training_cases=[c.case.name for c in cases if c.head == k])
        head_card["lineage"] = [dict(card.lineage[0], heads=head_names, head=name)]
        cards.append(ModelCard(**head_card))
    plan = transfer.prepare_multihead(architecture, arguments, 1, label_sets, head_names,
                                      lr=config.lr, seed=config.seed)
    return run_job(plan, cards[0], cases, val_cases, config, out_dir, events, resume,
                   overwrite, cancel_file, cards=cards)
