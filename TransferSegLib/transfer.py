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

Every strategy's freshly initialised label channels start at their share of the training
voxels (:func:`start_at_prior`, which the trainer calls unless ``prior_bias`` is off).

Head surgery and input adaptation are in :mod:`TransferSegLib.surgery`; multi-domain
co-training (one head per dataset) in :mod:`TransferSegLib.multihead`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import InputError
from TransferSegLib.strategies import DEFAULTS, STRATEGIES, defaults  # noqa: F401 (re-exported)
from TransferSegLib.surgery import (
    ChannelReport,
    HeadReport,
    adapt_input_channels,
    check_labels,
    head_surgery,
    seeded,
)

_FREEZING = ("finetune", "finetune-last", "two-stage")


_DEPTH = ("finetune", "two-stage")  # the strategies whose frozen depth can be chosen


# Attribute set on a frozen norm layer; read by the forward pre-hook and set_train_mode.
_FROZEN = "_transferseg_frozen"


_HOOKED = "_transferseg_hooked"


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
    # The base's own labels kept as outputs, learnt from its predictions (context.BaseContext).
    context: Any = None

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
    target_labels = check_labels(target_labels, "target labels")
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
    with seeded(seed):
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


def start_at_prior(plan, card: ModelCard,
                   cases: Sequence[Any]) -> dict[str, float]:
    """Set the output layer's bias of each freshly initialised label channel (every channel
    of ``scratch``, the new labels of a transfer) to the log of its share of the training
    voxels; returns those shares by label name (empty when nothing was set).

    ``cases`` are :class:`~TransferSegLib.sampling.PreparedCase` (a list or a case cache).
    A new channel otherwise starts about as likely as any other everywhere; the first steps
    then push it down over the whole patch, and a channel whose structure the features do not
    yet separate can stay below background for a long time. Started at its share it is not
    pushed down on average, and its first gradients say where it is. The share of a channel is
    counted over the cases that annotate it (at most 32 cases, spread over the list); a channel
    with no voxels in them keeps the network's own start. Reads cases only; draws no random
    numbers.
    """
    if plan.strategy == "scratch":
        fresh = set(card.labels)
    elif plan.head_report is not None:
        new = set(plan.head_report.new)
        fresh = {c for c, name in card.labels.items() if name in new}
    else:
        fresh = set()
    head = networks.head(card.architecture, plan.model)
    bias = getattr(head, "bias", None)
    if not fresh or bias is None or bias.shape[0] != card.out_channels:
        return {}
    counts = np.zeros(card.out_channels)
    totals = np.zeros(card.out_channels)
    count = len(cases)
    for index in sorted({round(i * (count - 1) / 31) for i in range(32)} if count > 32
                        else range(count)):
        case = cases[index]
        target = case.target[case.target >= 0]
        found = np.bincount(target.ravel(), minlength=card.out_channels)[:card.out_channels]
        counts += np.where(case.annotated, found, 0)
        totals += np.where(case.annotated, target.size, 0)
    shares = {c: counts[c] / totals[c] for c in sorted(fresh) if counts[c] > 0}
    with torch.no_grad():
        for channel, share in shares.items():
            bias[channel] = float(np.log(share))
    return {card.labels[c]: float(share) for c, share in shares.items()}
