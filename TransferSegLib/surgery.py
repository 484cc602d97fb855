"""Head surgery and input adaptation: a base network's tensors loaded into a network of the
new shape, by name, with a report of what was kept, renamed, started afresh or dropped.

:func:`head_surgery` keeps the output channels whose label names match the target's
(:func:`TransferSegLib.names.normalised`), starts new labels (and the background, when the
target has labels new to the base) afresh; :func:`adapt_input_channels` fits the first layer
to another number of image channels. Which axes depend on the label (or image channel) count
is found, not assumed: two shape-only networks that differ in that count are compared, and
the axes that differ are the tied ones. This covers MONAI's UNet and VNet, whose block before
the head also has one channel per label.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.errors import InputError
from TransferSegLib.names import normalised
from TransferSegLib.strategies import DEFAULTS, STRATEGIES, defaults  # noqa: F401 (re-exported)


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
        parts += [f"{heading}: {', '.join(names)}" for heading, names in (
            ("new (freshly initialised)", self.new), ("dropped from the base", self.dropped))
            if names]
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


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Fresh weights drawn from ``seed`` without disturbing the global generator (None: as is)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def shapes(architecture: str, in_channels: int, out_channels: int,
            arguments: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a network, built on the meta device (no memory) where possible."""
    try:
        with torch.device("meta"):
            net = networks.build_network(architecture, in_channels, out_channels, **arguments)
    except (RuntimeError, NotImplementedError):  # constructors that compute with tensors
        net = networks.build_network(architecture, in_channels, out_channels, **arguments)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def tied_axes(first: dict[str, tuple[int, ...]], second: dict[str, tuple[int, ...]],
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


def check_labels(labels: Any, what: str) -> dict[int, str]:
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
    base_labels = check_labels(base_labels, "base model's labels")
    target_labels = check_labels(target_labels, "target labels")
    arguments = networks.resolve_kwargs(architecture, **arguments)
    in_channels, base_out = _channels(architecture, model)
    if base_out != len(base_labels):
        raise InputError(
            f"The base model has {base_out} output channels but its card names "
            f"{len(base_labels)} labels; re-export the base model."
        )
    new_out = len(target_labels)
    base_shapes = shapes(architecture, in_channels, base_out, arguments)
    _check_fits(model, base_shapes, f"its card ({architecture}, {in_channels} in, {base_out} out)")
    tied = tied_axes(base_shapes, shapes(architecture, in_channels, base_out + 1, arguments),
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

    with seeded(seed):
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
    base_shapes = shapes(architecture, base_in, out_channels, arguments)
    _check_fits(model, base_shapes, f"its card ({architecture}, {base_in} in, {out_channels} out)")
    report = ChannelReport(base_in, new_in)
    target = networks.build_network(architecture, new_in, out_channels, **arguments)
    if new_in == base_in:
        target.load_state_dict(model.state_dict(), strict=True)
        return target, report
    tied = tied_axes(base_shapes, shapes(architecture, new_in, out_channels, arguments),
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

