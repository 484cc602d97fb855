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

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from TransferSegLib import events as ev
from TransferSegLib.checkpoint import ModelCard, save_model
from TransferSegLib.errors import InputError, ModelFileError, TransferSegError
from TransferSegLib.files import (
    OutputLock,
    atomic_output,
    remove_stale_partials,
    write_error,
)
from TransferSegLib.losses import IGNORE  # target of padding voxels: not in the loss
from TransferSegLib.process import STOP_SIGNALS
from TransferSegLib.sampling import (
    CaseCache,
    LabelledCase,
    PreparedCase,
    augment,
    prepare_case,
    sample_patch,
)
from TransferSegLib.settings import TrainConfig  # noqa: F401 (defined there, used here)
from TransferSegLib.tiling import CHANNELS_LAST_DEVICES, channels_last

Events = Callable[[dict], None]


def busy_cores(seconds: float = 0.25) -> float | None:
    """How many cores other programs keep busy now: the share of non-idle CPU time over
    ``seconds`` in ``/proc/stat`` (this process sleeps meanwhile), in cores. None off Linux."""
    def times() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total, idle = times()
        time.sleep(seconds)
        total2, idle2 = times()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total2 - total
    return 0.0 if elapsed <= 0 else (elapsed - (idle2 - idle)) / elapsed * (os.cpu_count() or 1)


def choose_threads(requested: int | None = None) -> int:
    """CPU threads for torch: ``requested``, else the cores not busy with other work.

    torch starts one thread per core; when another program keeps a core busy, its threads wait
    for each other at every operation and a step can take several times as long (on two busy
    cores one thread has run a step 5x faster than two). The busy cores are counted as
    training starts (:func:`busy_cores`; where that cannot be read, the 1-minute load average,
    which still counts a program for a minute after it ended).
    """
    if requested:
        return int(requested)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0
    return max(1, min(cores, torch.get_num_threads(), cores - int(busy + 0.5)))


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
    from TransferSegLib.inference import predict_prepared

    sums: dict[int, list[float]] = {}
    for case in cases:
        prediction = predict_prepared(model, card, case.image, device, overlap)
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

    Multi-head co-training (``plan.model`` a :class:`~TransferSegLib.multihead.MultiHeadNetwork`):
    ``cards[k]`` describes head ``k`` and ``heads`` gives the head of each training and
    validation case. Each step draws a head, then a batch from that head's cases. Besides
    ``model.safetensors``/``last.safetensors`` (head 0), every head is written as its own model
    file, ``model-<k>-<name>.safetensors``; any of them is a base model for fine-tuning.
    """
    from TransferSegLib import distributed, resources, transfer
    from TransferSegLib.inference import out_of_memory, select_device
    from TransferSegLib.losses import SegmentationLoss
    from TransferSegLib.multihead import MultiHeadNetwork

    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.device(select_device(config.device))
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(config.threads))
    resources.reset(device)
    multi = isinstance(plan.model, MultiHeadNetwork)
    shares = (transfer.start_at_prior(plan, card, train_cases)
              if config.prior_bias and not resume and not multi else {})
    model = plan.model.to(device)
    if multi:
        if not cards or heads is None or len(cards) != len(model.heads):
            raise TransferSegError("A multi-head network needs one card per head; this is a bug.")
        by_head = [[i for i, h in enumerate(heads[0]) if h == k] for k in range(len(cards))]
        live_heads = [k for k, members in enumerate(by_head) if members]
        model.select(0)
    # Channels-last: on the CPU (oneDNN) a training step of the CT base takes half the time.
    if device.type in CHANNELS_LAST_DEVICES:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(plan.param_groups, config)
    loss_fn = SegmentationLoss(dice_exclude=plan.context.new_channels if plan.context else ())
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
    emit(ev.start(strategy=plan.strategy, device=str(device), world=world,
                  threads=torch.get_num_threads() if device.type == "cpu" else None,
                  lr=config.lr, head_lr_factor=config.head_lr_factor, warmup=config.warmup,
                  steps=config.steps, from_step=meta["step"], cases=len(train_cases),
                  validation_cases=len(val_cases), report=plan.report))
    if shares:
        emit(ev.message("new label channels start at their share of the training voxels: "
                        + ", ".join(f"{name} {share:.1%}" for name, share in shares.items())))
    warning = resources.memory_warning(card.metrics, card.patch_size, config.batch_size, device)
    if warning:
        emit(ev.message(warning))

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
                    image, target = augment(image, target, rng, config.mirror, config.spatial,
                                            config.intensity_field)
                images.append(image)
                targets.append(target)
                annotated.append(case.annotated)
            x = torch.from_numpy(np.stack(images)).to(device)
            y = torch.from_numpy(np.stack(targets).astype(np.int64))[:, None][crop].to(device)
            mask = torch.from_numpy(np.stack(annotated)).to(device)
            x = channels_last(x)
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
                emit(ev.step(step + 1, config.steps, round(loss.item(), 5),
                             lr=optimizer.param_groups[0]["lr"],
                             patches_per_s=round(done * config.batch_size * world / elapsed, 2),
                             eta_s=round(elapsed / done * (config.steps - step - 1), 1),
                             **meta["resources"]))

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
                    emit(ev.stage(step + 1, 2,
                                  "validation Dice stopped improving: all layers unfrozen"))
            stop = decision == STOP
            cancelled = distributed.any_rank(cancel.requested, device)
            if rank == 0 and (cancelled or stop or (step + 1) % config.checkpoint_every == 0):
                if multi:
                    model.select(0)  # resume loads into the same head selection
                save_state(state_path, model, optimizer, meta)
                emit(ev.checkpoint(step + 1, str(state_path)))
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
        outcome = dict(model=str(best), last=str(last), step=meta["step"], best_dice=meta["best"],
                       seconds=round(seconds, 1), **meta["resources"])
        emit(ev.cancelled(**outcome) if status == "cancelled" else
             ev.done(status=status, **outcome))
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
    from TransferSegLib.multihead import MultiHeadNetwork

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
    emit(ev.validation(meta["step"], round(mean, 5), {k: round(v, 5) for k, v in scores.items()},
                       meta["best"], improved))
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


def _check_output(out_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume or overwrite:
        return
    if (out_dir / "model.safetensors").exists() or (out_dir / "state.safetensors").exists():
        raise TransferSegError(
            f"{out_dir} already holds a trained model; pass --resume to continue it, "
            "--overwrite to start again, or choose another --out folder."
        )


def run_training(
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
                events(ev.message(
                    f"{out_dir} was locked by process {lock.stale_pid}, which no longer runs "
                    "(killed or crashed): taking the folder over"))
            for path in remove_stale_partials(out_dir):
                events(ev.message(f"removed {path.name}, an unfinished file of the stopped "
                                  "process"))
        if overwrite and not resume and distributed.rank() == 0:
            for name in ("state.safetensors", "progress.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        def card_of(item: LabelledCase) -> ModelCard:
            return cards[item.head] if cards else card

        context = plan.context  # the base labels the training cases' background, or None

        def load(i: int):
            case = prepare_case(cases[i].case, cases[i].table, card_of(cases[i]),
                                cases[i].others_background)
            return context(case) if context else case

        cache = CaseCache(load, len(cases), config.cache_gb * 2**30)
        # Validating on the training cases (fewer than 3): reuse their prepared arrays.
        index_of = {id(c): i for i, c in enumerate(cases)}
        # A card that crops to the body is validated on the body, as segment runs it.
        crop = bool(card.inference.get("crop_body"))
        validation = []
        for c in val_cases:
            if id(c) not in index_of:
                validation.append(prepare_case(c.case, c.table, card_of(c),
                                               c.others_background, crop))
            else:  # scored on the user's labels only, not on the base's kept ones
                reused = cache[index_of[id(c)]]
                validation.append(context.scored(reused) if context else reused)
        heads = ([c.head for c in cases], [c.head for c in val_cases]) if cards else None
        return train(plan, card, cache, validation, config, out_dir, events, resume,
                     cancel_file, cards=cards, heads=heads)
    finally:
        if lock:
            lock.__exit__()

