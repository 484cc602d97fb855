"""The architecture registry: every network builds, runs, and knows its encoder, decoder, head."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from torch import nn

from TransferSegLib import networks
from TransferSegLib.errors import InputError

IN_CHANNELS, OUT_CHANNELS = 2, 3

# Tiny versions of each architecture, so the whole file runs in seconds on a CPU.
TINY = {
    "unet": {"channels": [4, 8, 16], "num_res_units": 1},
    "dynunet": {"levels": 3, "filters": [4, 8, 16]},
    "vnet": {},  # MONAI's VNet has a fixed width
    "unetr": {"img_size": 32, "feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2},
    "swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
    "segresnet": {"init_filters": 4, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    "segresnetds": {"init_filters": 4, "blocks_down": [1, 1, 1],
                    "norm": ["group", {"num_groups": 2}]},
    "medicalnet": {"depth": 10},
    "resnet_unet": {"layers": [1, 1, 1, 1], "block_inplanes": [4, 4, 8, 8],
                    "decoder_channels": [8, 8, 4, 4, 4]},
    "nnunet-plain": {"features_per_stage": [4, 8, 16]},
    "nnunet-resenc": {"features_per_stage": [4, 8, 16], "strides": [[1, 1, 1], [1, 2, 2],
                                                                    [2, 2, 2]]},
}
# SwinUNETR halves five times: its bottleneck needs more than one voxel for instance norm.
SHAPE = {"swinunetr": (32, 32, 64), "resnet_unet": (64, 64, 64)}

NEEDS_EINOPS = pytest.mark.skipif(
    importlib.util.find_spec("einops") is None, reason="transformer networks need einops"
)
ALL = [
    pytest.param(name, marks=NEEDS_EINOPS) if name in ("unetr", "swinunetr") else name
    for name in sorted(TINY)
]


@functools.cache
def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return networks.build_network(name, IN_CHANNELS, OUT_CHANNELS, **TINY[name]).eval()


def spatial(name: str) -> tuple[int, int, int]:
    return SHAPE.get(name, (32, 32, 32))


def run_with_hooks(name: str, blocks: list[nn.Module]) -> list[tuple[int, ...] | None]:
    """Shapes (N, C, Z, Y, X) of each block's output (None if not 5D) in one forward pass, then
    of the network's output."""
    model = tiny(name)
    shapes: dict[int, tuple[int, ...] | None] = {}

    def record(index: int):
        def hook(module, inputs, output):
            is_map = isinstance(output, torch.Tensor) and output.dim() == 5
            shapes.setdefault(index, tuple(output.shape) if is_map else None)

        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            output = model(torch.randn(1, IN_CHANNELS, *spatial(name)))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(shapes) == list(range(len(blocks))), "every block runs in the forward pass"
    return [shapes[i] for i in range(len(blocks))] + [tuple(output.shape)]


def voxels(shape: tuple[int, ...]) -> int:
    return int(torch.tensor(shape).prod())


def parameter_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def test_registry_lists_every_architecture():
    monai = ["unet", "dynunet", "vnet", "unetr", "swinunetr", "segresnet", "segresnetds"]
    published = ["medicalnet", "diag_unet", "hdbet", "linknet3d", "resnet_unet",
                 "nnunet-plain", "nnunet-resenc", "nnunet-plain-ensemble", "nnunet-resenc-ensemble"]
    assert networks.architectures() == sorted(monai + published)


@pytest.mark.parametrize("name", ALL)
def test_network_maps_patch_to_logits_of_same_size(name):
    model = tiny(name)
    with torch.no_grad():
        output = model(torch.randn(1, IN_CHANNELS, *spatial(name)))
    assert output.shape == (1, OUT_CHANNELS, *spatial(name))
    assert all(size % networks.patch_divisor(name, TINY[name]) == 0 for size in spatial(name))


@pytest.mark.parametrize("name", ALL)
def test_encoder_blocks_are_disjoint_submodules_shallowest_first(name):
    model = tiny(name)
    blocks = networks.encoder_blocks(name, model)
    assert blocks
    members = {id(m) for m in model.modules()}
    assert all(id(block) in members for block in blocks)
    # Disjoint: no block inside another, no parameter shared.
    for i, block in enumerate(blocks):
        inner = {id(m) for m in block.modules()}
        assert not any(id(other) in inner for j, other in enumerate(blocks) if j != i)
    ids = [id(p) for block in blocks for p in block.parameters()]
    assert len(ids) == len(set(ids))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < sum(p.numel() for block in blocks for p in block.parameters()) < total
    # Depth order: resolution never grows along the list and ends at the coarsest (bottleneck).
    sizes = [voxels(s[2:]) for s in run_with_hooks(name, blocks)[:-1] if s is not None]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] < sizes[0]


@pytest.mark.parametrize("name", ALL)
def test_decoder_blocks_go_from_deep_to_shallow_and_avoid_encoder_and_head(name):
    model = tiny(name)
    decoder = networks.decoder_blocks(name, model)
    assert decoder
    encoder_ids = set().union(*(parameter_ids(b) for b in networks.encoder_blocks(name, model)))
    head_ids = parameter_ids(networks.head(name, model))
    for block in decoder:
        assert not parameter_ids(block) & (encoder_ids | head_ids)
    sizes = [voxels(s[2:]) for s in run_with_hooks(name, decoder)[:-1] if s is not None]
    assert sizes == sorted(sizes)
    assert sizes[-1] == voxels(spatial(name))  # the last block works at full resolution


@pytest.mark.parametrize("name", ALL)
def test_head_is_the_leaf_convolution_giving_the_logits(name):
    model = tiny(name)
    layer = networks.head(name, model)
    assert isinstance(layer, nn.Conv3d)
    assert not list(layer.children())
    assert layer.weight.shape[0] == OUT_CHANNELS
    assert id(layer) in {id(m) for m in model.modules()}
    head_shape, output_shape = run_with_hooks(name, [layer])
    assert head_shape == output_shape == (1, OUT_CHANNELS, *spatial(name))


def test_unet_without_residual_units_has_a_transposed_head():
    model = networks.build_network("unet", 1, OUT_CHANNELS, channels=[4, 8], num_res_units=0)
    layer = networks.head("unet", model)
    assert isinstance(layer, nn.ConvTranspose3d)
    assert layer.weight.shape[1] == OUT_CHANNELS  # transposed: out channels on axis 1
    assert all(layer is not block for block in networks.decoder_blocks("unet", model))


def test_default_kwargs_rebuild_the_default_network():
    defaults = networks.default_kwargs("unet")
    assert defaults["channels"] == [16, 32, 64, 128, 256]
    assert defaults["strides"] == [2, 2, 2, 2]
    assert defaults["norm"] == "instance"
    plain = networks.build_network("unet", 1, 2)
    explicit = networks.build_network("unet", 1, 2, **defaults)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in explicit.parameters()]


def test_user_kwargs_override_defaults_and_derive_the_rest():
    resolved = networks.resolve_kwargs("unet", channels=[8, 16, 32], dropout=0.1)
    assert resolved["strides"] == [2, 2] and resolved["dropout"] == 0.1
    plan = networks.resolve_kwargs("dynunet", levels=4)
    assert plan["strides"] == [1, 2, 2, 2]
    assert plan["upsample_kernel_size"] == [2, 2, 2]
    assert len(plan["kernel_size"]) == len(plan["filters"]) == 4
    assert "levels" not in plan and plan["deep_supervision"] is False


def test_patch_divisor_follows_the_downsampling():
    assert networks.patch_divisor("unet") == 16
    assert networks.patch_divisor("unet", {"channels": [4, 8, 16], "strides": [2, 1]}) == 2
    assert networks.patch_divisor("unet", {"channels": [4, 8], "strides": [[2, 2, 1]]}) == 2
    assert networks.patch_divisor("dynunet", {"levels": 4}) == 8
    assert networks.patch_divisor("vnet") == 16
    assert networks.patch_divisor("unetr") == 16
    assert networks.patch_divisor("swinunetr") == 32
    assert networks.patch_divisor("segresnet", {"blocks_down": [1, 1, 1]}) == 4
    assert networks.fixed_input_size("unetr", {"img_size": 64}) == [64, 64, 64]
    assert networks.fixed_input_size("unet") is None


def test_divisor_is_tight_for_unet():
    # A patch of half the divisor does not go through four halvings and back.
    model = networks.build_network("unet", 1, 2, channels=[2, 2, 2], num_res_units=0)
    divisor = networks.patch_divisor("unet", {"channels": [2, 2, 2]})
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 2 * divisor, divisor, divisor)).shape[2:] == (8, 4, 4)
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 1, divisor + divisor // 2, divisor, divisor))


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(InputError) as caught:
        networks.build_network("resnet-unet-9000", 1, 2)
    message = str(caught.value)
    assert "resnet-unet-9000" in message
    assert all(name in message for name in networks.architectures())


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("unet", {"chanels": [4, 8]}, "chanels"),
        ("segresnet", {"strides": [2, 2]}, "strides"),
        ("unet", {"spatial_dims": 2}, "spatial_dims"),
        ("dynunet", {"levels": 3, "strides": [1, 2]}, "levels"),
    ],
)
def test_bad_argument_is_named(name, kwargs, expected):
    with pytest.raises(InputError) as caught:
        networks.build_network(name, 1, 2, **kwargs)
    assert expected in str(caught.value) and name in str(caught.value)


def test_bad_argument_value_is_an_input_error():
    with pytest.raises(InputError, match="segresnet"):
        networks.build_network("segresnet", 1, 2, init_filters=4, norm="no-such-norm")
    with pytest.raises(InputError, match="out_channels"):
        networks.build_network("unet", 1, 0)


def test_parts_of_a_different_network_are_refused():
    with pytest.raises(TypeError):
        networks.encoder_blocks("vnet", tiny("unet"))


@NEEDS_EINOPS
def test_swinunetr_v2_encoder_covers_the_whole_transformer():
    model = networks.build_network("swinunetr", 1, 2, **TINY["swinunetr"], use_v2=True)
    blocks = networks.encoder_blocks("swinunetr", model)
    covered = set().union(*(parameter_ids(b) for b in blocks))
    assert parameter_ids(model.swinViT) <= covered
    assert len(blocks) == len(networks.encoder_blocks("swinunetr", tiny("swinunetr"))) + 4
