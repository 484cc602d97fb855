"""Multi-domain co-training (Med3D): one network whose label-tied tensors (the head, and in
MONAI's UNet/VNet the block before it) exist once per dataset, everything else shared.
Selecting a head swaps the very parameter objects, so a step's gradients reach the shared
weights and that head only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.errors import InputError
from TransferSegLib.strategies import DEFAULTS, STRATEGIES, defaults  # noqa: F401 (re-exported)
from TransferSegLib.surgery import check_labels, seeded, shapes, tied_axes
from TransferSegLib.transfer import TransferPlan


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
        self.label_sets = [check_labels(labels, "dataset labels") for labels in label_sets]
        tied = tied_axes(shapes(architecture, in_channels, 2, arguments),
                          shapes(architecture, in_channels, 3, arguments), (2, 3),
                          "output labels", architecture)
        self.tied_keys = sorted(tied)
        with seeded(seed):
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

