"""Transfer-learning strategies: turn a base model into a ready-to-train model for new labels.

:func:`prepare` is the one call a trainer makes. It returns a :class:`TransferPlan`: the model,
the optimiser parameter groups, what is frozen, and a printable report. The strategies
(:data:`STRATEGIES`) are those the papers compare:

``scratch``
    A new, randomly initialised network of the base's architecture and arguments (the control).
``vanilla``
    The base's weights (after head surgery), every layer trained.
``finetune``
    The base's weights; the encoder (every encoder block, bottleneck included) frozen, the
    decoder and the head trained. With ``freeze_depth=k`` only the first ``k`` encoder blocks
    are frozen instead (0: nothing).
``finetune-last``
    The sparse-annotation 3D U-Net study's recipe: everything frozen but the last decoder block
    and the output head (in their code, the last 3x3x3 conv and the 1x1x1 head).
``discriminative``
    Every layer trained; the head (and any tensor head surgery initialised anew) at
    ``head_lr_factor`` times the learning rate, the rest at the learning rate. Med3D trained its
    new head at 100x with SGD; with Adam-type optimisers 10x (the default) is the safer choice.
``two-stage``
    ``finetune`` until validation Dice stops improving; then the trainer calls
    :func:`unfreeze_all` and trains everything at the learning rate.

Frozen layers have ``requires_grad`` off *and* their normalisation layers (batch or instance
norm with running statistics) stay in eval mode, so their running mean and variance never
change. Two mechanisms keep it so: :func:`set_train_mode` (call it instead of ``model.train()``)
and a forward pre-hook on every frozen norm layer that switches it back to eval mode should
anything (a plain ``model.train()``) switch it on. The hook is a no-op once unfrozen.

Head surgery (:func:`head_surgery`) and input adaptation (:func:`adapt_input_channels`) both
build a fresh network of the new shape and load the base tensors into it by name. Which axes
depend on the label (or image channel) count is found, not assumed: two shape-only networks
that differ in that count are compared, and the axes that differ are the tied ones. This covers
MONAI's UNet and VNet, whose block before the head also has one channel per label.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import InputError
from TransferSegLib.names import normalised
from TransferSegLib.strategies import DEFAULTS, STRATEGIES, defaults  # noqa: F401 (re-exported)

_FREEZING = ("finetune", "finetune-last", "two-stage")
_DEPTH = ("finetune", "two-stage")  # the strategies whose frozen depth can be chosen

# Attribute set on a frozen norm layer; read by the forward pre-hook and set_train_mode.
_FROZEN = "_transferseg_frozen"
_HOOKED = "_transferseg_hooked"


# --- reports ---------------------------------------------------------------------------------

@dataclass
class HeadReport:
    """What head surgery did with each label.

    ``kept``: (name, base channel, new channel) for every target label taken from the base,
    background (0 -> 0) included. ``new``: target labels the base does not know, freshly
    initialised. ``dropped``: base labels not in the target. ``remapped``: state-dict keys with
    an axis of one entry per label (the head, and in UNet/VNet the block before it).
    ``reinitialised``: those of them holding freshly initialised entries (for new labels).
    """

    kept: list[tuple[str, int, int]]
    new: list[str]
    dropped: list[str]
    remapped: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)

    def text(self) -> str:
        """One printable paragraph, e.g. ``reused 3 of 4 target labels from the base: ...``."""
        total = len(self.kept) + len(self.new)
        kept = ", ".join(f"{name} ({old}->{new})" for name, old, new in self.kept)
        parts = [f"reused {len(self.kept)} of {total} target labels from the base: {kept}"]
        if self.new:
            parts.append(f"new (freshly initialised): {', '.join(self.new)}")
        if self.dropped:
            parts.append(f"dropped from the base: {', '.join(self.dropped)}")
        if self.remapped:
            parts.append(f"{len(self.remapped)} tensors with one channel per label remapped")
        return "; ".join(parts) + "."


@dataclass
class ChannelReport:
    """How the layers reading the image were adapted to a new number of image channels."""

    base_in: int
    new_in: int
    adapted: list[str] = field(default_factory=list)  # state-dict keys changed

    def text(self) -> str:
        if self.base_in == self.new_in:
            return f"input channels unchanged ({self.base_in})."
        if self.base_in == 1:
            rule = f"the single-channel kernels copied to each channel and divided by {self.new_in}"
        else:
            rule = (f"the kernels summed over the {self.base_in} base channels, divided by "
                    f"{self.new_in} and copied to each channel")
        return (f"input channels {self.base_in} -> {self.new_in}: {rule}, so an image repeated "
                f"on every channel gives the base's output ({', '.join(self.adapted)}).")


# --- the plan ----------------------------------------------------------------------------------

@dataclass
class TransferPlan:
    """A model ready to train and how to train it (see :func:`prepare`).

    ``param_groups`` are ready for a torch optimiser (``torch.optim.AdamW(plan.param_groups)``);
    each has ``params``, ``lr`` and a ``name``. ``frozen`` names the frozen modules (the
    smallest set of module names covering them). Call :func:`set_train_mode` instead of
    ``model.train()``, and :func:`unfreeze_all` to start the second stage of ``two-stage``
    (then build the optimiser again from ``param_groups``).
    """

    strategy: str
    architecture: str
    arguments: dict[str, Any]
    model: nn.Module
    param_groups: list[dict[str, Any]]
    frozen: list[str]
    labels: dict[int, str]
    in_channels: int
    lr: float
    head_lr_factor: float
    freeze_depth: int | None
    head_report: HeadReport | None = None
    channel_report: ChannelReport | None = None
    report: str = ""
    stage: int = 1  # two-stage: 2 after unfreeze_all

    def lineage(self) -> dict[str, Any]:
        """A JSON-ready entry for the new model card's ``lineage``."""
        entry: dict[str, Any] = {"strategy": self.strategy, "lr": self.lr}
        if self.head_lr_factor != 1:
            entry["head_lr_factor"] = self.head_lr_factor
        if self.freeze_depth is not None:
            entry["freeze_depth"] = self.freeze_depth
        if self.head_report is not None:
            entry["kept_labels"] = [[n, old, new] for n, old, new in self.head_report.kept]
            entry["new_labels"] = list(self.head_report.new)
            entry["dropped_labels"] = list(self.head_report.dropped)
        if self.channel_report is not None and self.channel_report.adapted:
            entry["input_channels"] = [self.channel_report.base_in, self.channel_report.new_in]
        return entry


# --- helpers -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Fresh weights drawn from ``seed`` without disturbing the global generator (None: as is)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _shapes(architecture: str, in_channels: int, out_channels: int,
            arguments: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a network, built on the meta device (no memory) where possible."""
    try:
        with torch.device("meta"):
            net = networks.build_network(architecture, in_channels, out_channels, **arguments)
    except (RuntimeError, NotImplementedError):  # constructors that compute with tensors
        net = networks.build_network(architecture, in_channels, out_channels, **arguments)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def _tied_axes(first: dict[str, tuple[int, ...]], second: dict[str, tuple[int, ...]],
               counts: tuple[int, int], what: str, architecture: str) -> dict[str, list[int]]:
    """Axes whose length is the channel count ``what``: those that differ between two networks
    built with ``counts[0]`` and ``counts[1]`` of it. Any other difference is an error."""
    tied: dict[str, list[int]] = {}
    for key, shape in first.items():
        other = second[key]
        axes = [axis for axis, (a, b) in enumerate(zip(shape, other, strict=True)) if a != b]
        if axes and not all(shape[a] == counts[0] and other[a] == counts[1] for a in axes):
            raise InputError(
                f"Cannot adapt the {what} of {architecture}: its tensor {key!r} grows with them "
                "but is not one entry per channel; train this model from scratch instead."
            )
        if axes:
            tied[key] = axes
    return tied


def _check_fits(model: nn.Module, expected: dict[str, tuple[int, ...]], what: str) -> None:
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    shapes = [key for key in expected if key in actual and actual[key] != expected[key]]
    if missing or extra or shapes:
        if missing:
            detail = f"it lacks {missing[0]!r}"
        elif extra:
            detail = f"it has an unexpected {extra[0]!r}"
        else:
            key = shapes[0]
            detail = f"{key!r} has shape {list(actual[key])}, expected {list(expected[key])}"
        raise InputError(
            f"The base model is not the network {what} describes ({detail}); use the "
            "architecture and arguments from the base model's card."
        )


def _channels(architecture: str, model: nn.Module) -> tuple[int, int]:
    """(image channels, label channels) of ``model``, read from its first and last layers."""
    try:
        first = networks.encoder_blocks(architecture, model)[0]
        out_conv = networks.head(architecture, model)
    except TypeError as error:
        raise InputError(
            f"The base model is not a {architecture} network ({error}); use the architecture "
            "named in its model card."
        ) from None
    convs = [m for m in first.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise InputError(f"Cannot find the layer reading the image in this {architecture}.")
    return int(convs[0].in_channels), int(out_conv.out_channels)


def _index(ndim: int, axes: list[int], indices: torch.Tensor) -> tuple:
    """An index selecting ``indices`` on every axis in ``axes`` (an outer product, as np.ix_)."""
    index: list[Any] = [slice(None)] * ndim
    for position, axis in enumerate(axes):
        view = [1] * len(axes)
        view[position] = -1
        index[axis] = indices.view(view)
    return tuple(index)


def _output_axis(model: nn.Module, key: str) -> int | None:
    """The output-channel axis of the weight ``key`` (1 for transposed convs), else None."""
    module_name, _, tensor_name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if tensor_name != "weight":
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return 0
    return None


def _check_labels(labels: Any, what: str) -> dict[int, str]:
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"The {what} must map output channels to label names, 0 = background.")
    if 0 not in labels:
        raise InputError(
            f"The {what} {dict(labels)} have no background at channel 0; put the background "
            "first (0: 'background') and number the other labels from 1."
        )
    if sorted(labels) != list(range(len(labels))):
        raise InputError(
            f"The {what} must number their channels 0..{len(labels) - 1} without gaps, not "
            f"{sorted(labels)}."
        )
    if not all(isinstance(name, str) and name.strip() for name in labels.values()):
        raise InputError(f"Every one of the {what} needs a name; got {dict(labels)}.")
    folded = [normalised(name) for name in labels.values()]
    if len(set(folded)) != len(folded):
        raise InputError(
            f"The {what} name a label twice (ignoring case and separators): {dict(labels)}."
        )
    return {int(channel): labels[channel] for channel in sorted(labels)}


# --- head surgery ------------------------------------------------------------------------------

def head_surgery(
    architecture: str,
    model: nn.Module,
    base_labels: dict[int, str],
    target_labels: dict[int, str],
    *,
    arguments: dict[str, Any],
    seed: int | None = None,
    keep_background: bool | None = None,
) -> tuple[nn.Module, HeadReport]:
    """A copy of ``model`` whose output channels are ``target_labels``; the base is untouched.

    ``keep_background`` (None: only when every target label is one of the base's): copy the
    base's background channel. The base's background means "none of its labels", so for a
    target with new labels it is freshly initialised like theirs.

    Labels are matched by name (ignoring case and separators), not by position as in the
    sparse-annotation study's code (which keeps the last N channels), so an organ keeps its
    weights whatever its new index; channel 0 is the background in both and, when kept, maps 0 -> 0
    whatever its name. Every tensor with one entry per label (found by
    comparing two shape-only networks, see the module docstring) is rebuilt: entries of matched
    labels are copied bit-exact to their new index, on every such axis (the head's output and,
    in UNet/VNet, its input, which is the previous block's output); entries of new labels keep
    the architecture's own initialisation (from a freshly built network); base labels not in
    the target are dropped. In a weight with both axes, a kept label's output starts with zero
    weight from the new labels' channels, so adding labels leaves the kept logits as they were.
    Every other tensor is copied as is. ``arguments`` are the base's (its card's); ``seed``
    fixes the fresh initialisation. Returns the new network (CPU) and a :class:`HeadReport`.
    """
    base_labels = _check_labels(base_labels, "base model's labels")
    target_labels = _check_labels(target_labels, "target labels")
    arguments = networks.resolve_kwargs(architecture, **arguments)
    in_channels, base_out = _channels(architecture, model)
    if base_out != len(base_labels):
        raise InputError(
            f"The base model has {base_out} output channels but its card names "
            f"{len(base_labels)} labels; re-export the base model."
        )
    new_out = len(target_labels)
    base_shapes = _shapes(architecture, in_channels, base_out, arguments)
    _check_fits(model, base_shapes, f"its card ({architecture}, {in_channels} in, {base_out} out)")
    tied = _tied_axes(base_shapes, _shapes(architecture, in_channels, base_out + 1, arguments),
                      (base_out, base_out + 1), "labels", architecture)

    base_index = {normalised(name): channel for channel, name in base_labels.items() if channel}
    kept: list[tuple[str, int, int]] = []
    new: list[str] = []
    for channel, name in target_labels.items():
        if channel == 0:
            continue
        if normalised(name) in base_index:
            kept.append((name, base_index[normalised(name)], channel))
        else:
            new.append(name)
    if keep_background is None:
        # The base's background means "none of the base's labels": a label new to the base is
        # background to it, and a kept background channel fights the new one (bench/README.md).
        keep_background = not new
    if keep_background:
        kept.insert(0, (target_labels[0], 0, 0))
    else:
        new.insert(0, target_labels[0])
    used = {old for _, old, _ in kept}
    dropped = [name for channel, name in base_labels.items() if channel not in used]
    old_index = torch.tensor([old for _, old, _ in kept], dtype=torch.long)
    new_index = torch.tensor([channel for _, _, channel in kept], dtype=torch.long)
    fresh_index = torch.tensor([c for c, n in target_labels.items() if n in new], dtype=torch.long)

    with _seeded(seed):
        target = networks.build_network(architecture, in_channels, new_out, **arguments)
    base_state = model.state_dict()
    state = {key: value.detach().clone() for key, value in target.state_dict().items()}
    reinitialised: list[str] = []
    with torch.no_grad():
        for key, value in state.items():
            source = base_state[key].detach().to(value.device)
            axes = tied.get(key)
            if not axes:
                value.copy_(source)
                continue
            value[_index(value.ndim, axes, new_index)] = source[
                _index(source.ndim, axes, old_index)].to(value.dtype)
            if len(fresh_index):
                reinitialised.append(key)
                output_axis = _output_axis(target, key)
                if len(axes) == 2 and output_axis in axes:
                    input_axis = axes[1 - axes.index(output_axis)]
                    index: list[Any] = [slice(None)] * value.ndim
                    index[output_axis] = new_index.view(-1, 1)
                    index[input_axis] = fresh_index.view(1, -1)
                    value[tuple(index)] = 0
    target.load_state_dict(state, strict=True)
    report = HeadReport(kept, new, dropped, sorted(tied), reinitialised)
    return target, report


# --- input channels ----------------------------------------------------------------------------

def adapt_input_channels(
    architecture: str,
    model: nn.Module,
    base_in: int,
    new_in: int,
    *,
    arguments: dict[str, Any],
) -> tuple[nn.Module, ChannelReport]:
    """A copy of ``model`` reading ``new_in`` image channels instead of ``base_in``.

    The kernels of every layer reading the image (found as the tensors whose shape follows the
    image channel count) are summed over the base channels, divided by ``new_in`` and copied to
    each new channel: for 1 -> n the single-channel kernel divided by n. So an image repeated on
    every channel gives the same output as the base on the image; a true multi-channel image
    starts from that average and training separates the channels. Biases and everything else
    are copied as is. Returns the new network (CPU) and a :class:`ChannelReport`.
    """
    for label, value in (("base_in", base_in), ("new_in", new_in)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{label} must be a positive whole number of channels, not {value!r}.")
    arguments = networks.resolve_kwargs(architecture, **arguments)
    actual_in, out_channels = _channels(architecture, model)
    if actual_in != base_in:
        raise InputError(
            f"The base model reads {actual_in} image channels, not {base_in}; check its card."
        )
    base_shapes = _shapes(architecture, base_in, out_channels, arguments)
    _check_fits(model, base_shapes, f"its card ({architecture}, {base_in} in, {out_channels} out)")
    report = ChannelReport(base_in, new_in)
    target = networks.build_network(architecture, new_in, out_channels, **arguments)
    if new_in == base_in:
        target.load_state_dict(model.state_dict(), strict=True)
        return target, report
    tied = _tied_axes(base_shapes, _shapes(architecture, new_in, out_channels, arguments),
                      (base_in, new_in), "image channels", architecture)
    base_state = model.state_dict()
    state = {}
    for key, value in target.state_dict().items():
        source = base_state[key].detach().to(value.device, value.dtype)
        axes = tied.get(key)
        if not axes:
            state[key] = source.clone()
            continue
        output_axis = _output_axis(target, key)
        input_axis = None if output_axis is None else 1 - output_axis
        if input_axis is None or axes != [input_axis]:
            raise InputError(
                f"Cannot adapt the image channels of {architecture}: its tensor {key!r} is not "
                "a kernel reading the image; train this model from scratch instead."
            )
        summed = source.sum(dim=input_axis, keepdim=True) / new_in
        state[key] = summed.expand_as(value).clone()
        report.adapted.append(key)
    target.load_state_dict(state, strict=True)
    return target, report


# --- freezing ----------------------------------------------------------------------------------

def _hold_statistics(module: nn.Module, inputs: Any) -> None:
    """Forward pre-hook of a frozen norm layer: whatever switched it to training, use (and never
    update) the running statistics."""
    if getattr(module, _FROZEN, False) and module.training:
        module.training = False


def _freeze(modules: list[nn.Module]) -> int:
    """Freeze ``modules``: no gradients, norm layers fixed in eval mode. Returns the number of
    norm layers held."""
    held = 0
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._NormBase):
                setattr(layer, _FROZEN, True)
                if not getattr(layer, _HOOKED, False):
                    layer.register_forward_pre_hook(_hold_statistics)
                    setattr(layer, _HOOKED, True)
                layer.eval()
                held += 1
    return held


def _complement(model: nn.Module, keep: list[nn.Module]) -> list[nn.Module]:
    """The largest modules of ``model`` that neither are nor contain nor lie inside a module in
    ``keep``; together with ``keep`` they hold every parameter (glue without any is skipped)."""
    keep_ids = {id(m) for m in keep}
    found: list[nn.Module] = []
    seen: set[int] = set()

    def walk(module: nn.Module) -> None:
        if id(module) in keep_ids or id(module) in seen:
            return
        seen.add(id(module))
        if not any(id(m) in keep_ids for m in module.modules()):
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                found.append(module)
            return
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(False)  # a container's own parameters: frozen with it
        for child in module.children():
            walk(child)

    walk(model)
    return found


def _names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    by_id = {id(module): name for name, module in model.named_modules()}
    return [by_id[id(module)] or "(the whole model)" for module in modules]


def set_train_mode(model: nn.Module, plan: TransferPlan | None = None) -> nn.Module:
    """Call this instead of ``model.train()``: train mode, except frozen norm layers (eval).

    ``model`` may be a wrapper (DDP); ``plan`` is accepted for symmetry and not needed (the
    frozen layers are marked on the model itself). Returns ``model``.
    """
    model.train()
    for layer in model.modules():
        if getattr(layer, _FROZEN, False):
            layer.eval()
    return model


def unfreeze_all(model: nn.Module, plan: TransferPlan,
                 optimizer: torch.optim.Optimizer | None = None) -> list[dict[str, Any]]:
    """Second stage of ``two-stage``: every parameter trainable at the plan's learning rate.

    Updates ``plan`` (``param_groups`` one group of all parameters, ``frozen`` empty,
    ``stage`` 2) and returns the new groups: build the optimiser again from them (and wrap the
    model for DDP again: DDP only tracks parameters that required gradients when wrapped). Or
    pass ``optimizer`` to add the newly trainable parameters to it as a group at the plan's
    learning rate, keeping the state of those it already had.
    """
    before = {id(p) for p in model.parameters() if p.requires_grad}
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for layer in model.modules():
        if getattr(layer, _FROZEN, False):
            setattr(layer, _FROZEN, False)
            layer.train(model.training)
    if optimizer is not None:
        had = {id(p) for group in optimizer.param_groups for p in group["params"]}
        added = [p for p in model.parameters() if id(p) not in had and id(p) not in before]
        if added:
            optimizer.add_param_group({"params": added, "lr": plan.lr, "name": "unfrozen"})
    plan.param_groups = [{"params": list(plan.model.parameters()), "lr": plan.lr, "name": "all"}]
    plan.frozen = []
    plan.stage = 2
    return plan.param_groups


# --- prepare -----------------------------------------------------------------------------------

def _same_arguments(architecture: str, first: dict[str, Any], second: dict[str, Any]) -> bool:
    def canonical(arguments: dict[str, Any]) -> str:
        resolved = networks.resolve_kwargs(architecture, **arguments)
        return json.dumps(resolved, sort_keys=True, default=str)

    return canonical(first) == canonical(second)


def _count(parameters: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def prepare(
    strategy: str,
    architecture: str | None,
    arguments: dict[str, Any] | None,
    base_model: nn.Module | None,
    base_card: ModelCard | None,
    target_labels: dict[int, str],
    in_channels: int,
    *,
    lr: float | None = None,
    head_lr_factor: float | None = None,
    freeze_depth: int | None = None,
    seed: int | None = None,
) -> TransferPlan:
    """A :class:`TransferPlan` for training ``strategy`` (one of :data:`STRATEGIES`).

    ``target_labels`` maps output channel -> label name, 0 = background; ``in_channels`` is the
    number of image channels (modalities) of the new data. Every strategy but ``scratch`` needs
    ``base_model`` and its ``base_card``; its architecture and arguments are the card's (given
    ones must agree). ``scratch`` uses ``architecture``/``arguments`` or the card's and ignores
    the weights. ``freeze_depth`` (``finetune`` and ``two-stage`` only): freeze just the first
    ``k`` encoder blocks, 0 <= k <= their number, instead of all but the last decoder block and
    the head. ``head_lr_factor`` (``discriminative``): the head's learning rate over ``lr``.
    ``seed`` fixes the fresh weights (None: the global generator). The model is on the CPU.
    ``lr`` and ``head_lr_factor`` default to the strategy's own (:func:`defaults`); a factor
    other than 1 puts the head and the freshly initialised label channels in their own
    parameter group, at ``lr * head_lr_factor``.
    """
    strategy_defaults = defaults(strategy)
    lr = strategy_defaults["lr"] if lr is None else lr
    if head_lr_factor is None:
        head_lr_factor = strategy_defaults["head_lr_factor"]
    target_labels = _check_labels(target_labels, "target labels")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise InputError(f"in_channels must be a positive whole number, not {in_channels!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InputError(f"The learning rate must be a positive number, not {lr!r}.")
    if not (isinstance(head_lr_factor, (int, float)) and head_lr_factor > 0):
        raise InputError(f"head_lr_factor must be a positive number, not {head_lr_factor!r}.")
    if freeze_depth is not None and strategy not in _DEPTH:
        raise InputError(
            f"freeze_depth applies to {' and '.join(_DEPTH)} only, not {strategy}; "
            "leave it unset."
        )
    if strategy != "scratch" and (base_model is None or base_card is None):
        raise InputError(
            f"Strategy {strategy!r} starts from a base model; give one (and its card), or use "
            "'scratch'."
        )

    if strategy != "scratch":
        assert base_card is not None  # checked above; for type checkers
        if architecture is not None and architecture != base_card.architecture:
            raise InputError(
                f"The base model is a {base_card.architecture}, not a {architecture}; leave the "
                "architecture unset to use the base's."
            )
        if arguments is not None and not _same_arguments(
                base_card.architecture, arguments, base_card.arguments):
            raise InputError(
                "The given network arguments differ from the base model's; leave them unset to "
                "use the base's (a transferred model keeps its architecture)."
            )
        architecture, arguments = base_card.architecture, base_card.arguments
    elif architecture is None:
        if base_card is None:
            raise InputError("Strategy 'scratch' without a base model needs an architecture name.")
        architecture = base_card.architecture
    if arguments is None and base_card is not None and architecture == base_card.architecture:
        arguments = base_card.arguments
    arguments = networks.resolve_kwargs(architecture, **(arguments or {}))

    head_report = channel_report = None
    with _seeded(seed):
        if strategy == "scratch":
            model = networks.build_network(
                architecture, in_channels, len(target_labels), **arguments)
        else:
            assert base_model is not None and base_card is not None
            model, channel_report = base_model, ChannelReport(base_card.in_channels, in_channels)
            if in_channels != base_card.in_channels:
                model, channel_report = adapt_input_channels(
                    architecture, base_model, base_card.in_channels, in_channels,
                    arguments=arguments)
            model, head_report = head_surgery(
                architecture, model, base_card.labels, target_labels, arguments=arguments)

    head_module = networks.head(architecture, model)
    parameters = list(model.parameters())
    frozen_modules: list[nn.Module] = []
    if strategy in _DEPTH:
        encoder = networks.encoder_blocks(architecture, model)
        if freeze_depth is None:
            frozen_modules = list(encoder)
        else:
            if isinstance(freeze_depth, bool) or not isinstance(freeze_depth, int) or not (
                    0 <= freeze_depth <= len(encoder)):
                raise InputError(
                    f"freeze_depth must be a whole number from 0 to {len(encoder)} (the "
                    f"{architecture}'s encoder blocks), not {freeze_depth!r}."
                )
            frozen_modules = encoder[:freeze_depth]
    elif strategy in _FREEZING:
        last_decoder = networks.decoder_blocks(architecture, model)[-1]
        frozen_modules = _complement(model, [last_decoder, head_module])
    held = _freeze(frozen_modules)
    frozen = _names(model, frozen_modules)
    trainable = [p for p in parameters if p.requires_grad]

    if strategy != "scratch" and head_lr_factor != 1:
        named = dict(model.named_parameters())
        fast_ids = {id(p) for p in head_module.parameters()}
        if head_report is not None:
            fast_ids |= {id(named[key]) for key in head_report.reinitialised if key in named}
        fast = [p for p in trainable if id(p) in fast_ids]
        slow = [p for p in trainable if id(p) not in fast_ids]
        param_groups = [
            {"params": slow, "lr": lr, "name": "pretrained"},
            {"params": fast, "lr": lr * head_lr_factor, "name": "head"},
        ]
    else:
        param_groups = [{"params": trainable, "lr": lr,
                         "name": "trainable" if frozen_modules else "all"}]
    param_groups = [group for group in param_groups if group["params"]]

    lines = [f"strategy {strategy} ({architecture}, {len(target_labels)} output channels, "
             f"{in_channels} input channels)"]
    if strategy == "scratch":
        lines.append("all weights freshly initialised.")
    if channel_report is not None:
        lines.append(channel_report.text())
    if head_report is not None:
        lines.append(head_report.text())
    total = _count(parameters)
    share = _count(trainable) / total if total else 0.0
    if frozen_modules:
        lines.append(
            f"trainable: {_count(trainable):,} of {total:,} parameters ({share:.1%}); frozen: "
            f"{', '.join(frozen)}; {held} norm layers in frozen blocks kept in eval mode."
        )
    else:
        lines.append(f"trainable: all {total:,} parameters.")
    if len(param_groups) == 2:
        fast_count = _count(param_groups[-1]["params"])
        lines.append(
            f"learning rate {lr:g}; the head and new label channels ({fast_count:,} "
            f"parameters) at {head_lr_factor:g}x = {lr * head_lr_factor:g}."
        )
    if strategy == "two-stage":
        lines.append("all layers are unfrozen when validation Dice stops improving.")

    return TransferPlan(
        strategy=strategy, architecture=architecture, arguments=arguments, model=model,
        param_groups=param_groups, frozen=frozen, labels=target_labels,
        in_channels=in_channels, lr=float(lr), head_lr_factor=float(head_lr_factor),
        freeze_depth=freeze_depth, head_report=head_report, channel_report=channel_report,
        report="\n".join(lines),
    )


# --- multi-domain co-training (Med3D) ----------------------------------------------------------

class _HeadTensors(nn.Module):
    """The label-tied tensors of one dataset's head, under keys with '.' spelled '__'."""


class MultiHeadNetwork(nn.Module):
    """One network shared by several datasets, with a separate output head per dataset.

    Med3D co-trains one encoder on many datasets whose label sets differ, giving each dataset
    its own segmentation branch. Here every tensor with one entry per label (the head, and in
    MONAI's UNet/VNet the block before it; found as in :func:`head_surgery`) exists once per
    dataset; everything else is shared. :meth:`select` points the shared network (``body``) at
    one dataset's head tensors, by swapping the very parameter objects, so a forward pass and
    its gradients reach the shared weights and that head only. ``body`` is then an ordinary
    network of that dataset's label count, which :meth:`network` hands out for saving.

    Forward: (N, in_channels, Z, Y, X) -> (N, len(label_sets[selected]), Z, Y, X).
    """

    def __init__(self, architecture: str, arguments: dict[str, Any], in_channels: int,
                 label_sets: list[dict[int, str]], seed: int | None = None) -> None:
        super().__init__()
        if len(label_sets) < 1:
            raise InputError("A multi-head network needs at least one dataset's labels.")
        self.architecture, self.arguments = architecture, dict(arguments)
        self.label_sets = [_check_labels(labels, "dataset labels") for labels in label_sets]
        tied = _tied_axes(_shapes(architecture, in_channels, 2, arguments),
                          _shapes(architecture, in_channels, 3, arguments), (2, 3),
                          "output labels", architecture)
        self.tied_keys = sorted(tied)
        with _seeded(seed):
            nets = [networks.build_network(architecture, in_channels, len(labels), **arguments)
                    for labels in self.label_sets]
        self.body = nets[0]
        self.heads = nn.ModuleList()
        for net in nets:
            holder = _HeadTensors()
            for key in self.tied_keys:
                owner, attr = self._owner(net, key)
                if attr in owner._parameters:
                    holder.register_parameter(key.replace(".", "__"), owner._parameters[attr])
                else:
                    holder.register_buffer(key.replace(".", "__"), owner._buffers[attr])
            self.heads.append(holder)
        self.selected = 0

    @staticmethod
    def _owner(net: nn.Module, key: str) -> tuple[nn.Module, str]:
        path, _, attr = key.rpartition(".")
        return (net.get_submodule(path) if path else net), attr

    def select(self, index: int) -> MultiHeadNetwork:
        """Route forward passes through dataset ``index``'s head; returns self."""
        holder = self.heads[index]
        for key in self.tied_keys:
            owner, attr = self._owner(self.body, key)
            name = key.replace(".", "__")
            if attr in owner._parameters:
                owner._parameters[attr] = holder._parameters[name]
            else:
                owner._buffers[attr] = holder._buffers[name]
        self.selected = index
        return self

    def network(self, index: int) -> nn.Module:
        """The shared network with dataset ``index``'s head selected (not a copy)."""
        return self.select(index).body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def prepare_multihead(architecture: str, arguments: dict[str, Any] | None, in_channels: int,
                      label_sets: list[dict[int, str]], names: list[str], *, lr: float = 1e-3,
                      seed: int | None = None) -> TransferPlan:
    """A plan for co-training a new network on several datasets, one head each (Med3D).

    ``label_sets[k]`` is dataset ``k``'s output channel -> label name (0 = background) and
    ``names[k]`` its name for reports. Everything is trained from scratch at ``lr``.
    """
    arguments = networks.resolve_kwargs(architecture, **(arguments or {}))
    model = MultiHeadNetwork(architecture, arguments, in_channels, label_sets, seed)
    shared = sum(p.numel() for p in model.body.parameters()) - sum(
        p.numel() for p in model.heads[0].parameters())
    per_head = ", ".join(f"{name} ({len(labels) - 1} labels)"
                         for name, labels in zip(names, label_sets, strict=True))
    report = (f"multi-domain co-training of a new {architecture}: {shared:,} shared parameters, "
              f"one head per dataset: {per_head}.")
    return TransferPlan(
        strategy="scratch", architecture=architecture, arguments=arguments, model=model,
        param_groups=[{"params": list(model.parameters()), "lr": lr, "name": "all"}],
        frozen=[], labels=label_sets[0], in_channels=in_channels, lr=lr, head_lr_factor=1.0,
        freeze_depth=None, report=report,
    )
