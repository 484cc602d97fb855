"""Transfer strategies: what stays frozen really stays, head surgery keeps labels bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from TransferSegLib import networks, surgery, transfer
from TransferSegLib.checkpoint import ModelCard
from TransferSegLib.errors import InputError

BASE_LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
TARGET_LABELS = {0: "background", 1: "kidney", 2: "pancreas", 3: "liver"}
SIZE = 16


def _arguments(architecture: str = "unet", **kwargs) -> dict:
    if architecture == "unet":
        kwargs = {"channels": [4, 8, 16], "norm": "batch", **kwargs}
    elif architecture == "segresnet":
        kwargs = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], **kwargs}
    return networks.resolve_kwargs(architecture, **kwargs)


def _base(architecture: str = "unet", labels: dict | None = None, in_channels: int = 1,
          seed: int = 0, **kwargs) -> tuple[nn.Module, ModelCard]:
    """A small trained-looking base model: random weights, non-trivial norm statistics."""
    labels = labels or BASE_LABELS
    arguments = _arguments(architecture, **kwargs)
    torch.manual_seed(seed)
    model = networks.build_network(architecture, in_channels, len(labels), **arguments)
    with torch.no_grad():  # running statistics unlike a fresh network's (0 and 1)
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm3d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
    card = ModelCard(architecture=architecture, in_channels=in_channels,
                     out_channels=len(labels), labels=dict(labels), spacing=[1.0, 1.0, 1.0],
                     patch_size=[SIZE] * 3, normalisation={"kind": "none"}, arguments=arguments)
    return model.eval(), card


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _train(plan: transfer.TransferPlan, steps: int = 3) -> None:
    """A few Adam steps on random data, through the trainer's calls."""
    torch.manual_seed(1)
    optimizer = torch.optim.Adam(plan.param_groups)
    channels = len(plan.labels)
    for _ in range(steps):
        transfer.set_train_mode(plan.model, plan)
        x = torch.randn(2, plan.in_channels, SIZE, SIZE, SIZE)
        y = torch.randint(0, channels, (2, SIZE, SIZE, SIZE))
        loss = nn.functional.cross_entropy(plan.model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _keys_under(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    """State-dict keys of tensors held by ``modules`` (and their submodules)."""
    names = {id(m): name for name, m in model.named_modules()}
    prefixes = [names[id(m)] + "." for m in modules]
    return {key for key in model.state_dict() if any(key.startswith(p) for p in prefixes)}


def _is_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _assert_only_these_frozen(plan, frozen_keys: set[str]) -> None:
    """Train ``plan`` a few steps: the ``frozen_keys`` tensors stay bit-identical, every other
    tensor changes."""
    before = _snapshot(plan.model)
    _train(plan)
    after = plan.model.state_dict()
    for key in before:
        if key in frozen_keys:
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"
        elif not key.endswith("num_batches_tracked"):
            assert not torch.equal(before[key], after[key]), f"{key} did not train"


# --- freezing ----------------------------------------------------------------------------------

def test_finetune_freezes_the_encoder_and_trains_the_decoder_and_head():
    base, card = _base()
    plan = transfer.prepare("finetune", None, None, base, card, TARGET_LABELS, 1, lr=1e-2)
    model = plan.model
    frozen_keys = _keys_under(model, networks.encoder_blocks("unet", model))
    params = dict(model.named_parameters())
    assert {k for k, p in params.items() if not p.requires_grad} == frozen_keys & set(params)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    assert 0.05 < trainable / sum(p.numel() for p in params.values()) < 0.95
    _assert_only_these_frozen(plan, frozen_keys)


def test_head_lr_factor_gives_finetune_a_fast_head_group_of_trainable_tensors():
    base, card = _base()
    plan = transfer.prepare("finetune", None, None, base, card, TARGET_LABELS, 1, lr=1e-3,
                            head_lr_factor=5.0)
    lr_of = {id(p): group["lr"] for group in plan.param_groups for p in group["params"]}
    assert all(p.requires_grad for group in plan.param_groups for p in group["params"])
    head = networks.head("unet", plan.model)
    assert lr_of[id(head.weight)] == pytest.approx(5e-3)
    assert {round(g["lr"], 9) for g in plan.param_groups} == {1e-3, 5e-3}


def test_strategies_have_their_own_default_learning_rates():
    base, card = _base()
    for strategy in transfer.STRATEGIES:
        chosen = transfer.defaults(strategy)
        plan = transfer.prepare(strategy, "unet", None, base, card, TARGET_LABELS, 1)
        assert plan.lr == chosen["lr"] and plan.head_lr_factor == chosen["head_lr_factor"]
    with pytest.raises(InputError, match="Unknown transfer strategy"):
        transfer.defaults("magic")


def test_finetune_last_trains_only_the_last_decoder_block_and_head():
    base, card = _base()
    plan = transfer.prepare("finetune-last", None, None, base, card, TARGET_LABELS, 1, lr=1e-2)
    model = plan.model
    trainable_blocks = [networks.decoder_blocks("unet", model)[-1], networks.head("unet", model)]
    trainable_keys = _keys_under(model, trainable_blocks)
    params = dict(model.named_parameters())
    assert {k for k, p in params.items() if p.requires_grad} == trainable_keys & set(params)
    assert plan.frozen == ["model.0", "model.1"]

    before = _snapshot(model)
    _train(plan)
    after = model.state_dict()
    frozen_statistics = [k for k in before if _is_statistic(k) and k not in trainable_keys]
    assert len(frozen_statistics) >= 12  # batch norm in every frozen block
    for key in before:
        if key in trainable_keys:
            if not key.endswith("num_batches_tracked"):
                assert not torch.equal(before[key], after[key]), f"{key} did not train"
        else:
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"


def test_a_plain_train_call_does_not_update_frozen_norm_statistics():
    base, card = _base()
    plan = transfer.prepare("finetune-last", "unet", None, base, card, BASE_LABELS, 1)
    before = _snapshot(plan.model)
    plan.model.train()  # not set_train_mode: the forward pre-hook must still hold them
    plan.model(torch.randn(2, 1, SIZE, SIZE, SIZE))
    trainable = _keys_under(plan.model, [networks.decoder_blocks("unet", plan.model)[-1]])
    for key, value in plan.model.state_dict().items():
        if _is_statistic(key) and key not in trainable:
            assert torch.equal(before[key], value), key
    assert any(not torch.equal(before[k], plan.model.state_dict()[k])
               for k in trainable if k.endswith("running_mean"))


def test_freeze_depth_freezes_only_the_first_encoder_blocks():
    base, card = _base()
    plan = transfer.prepare("finetune", None, None, base, card, TARGET_LABELS, 1,
                            freeze_depth=2, lr=1e-2)
    encoder = networks.encoder_blocks("unet", plan.model)
    frozen_keys = _keys_under(plan.model, encoder[:2])
    assert plan.frozen == ["model.0", "model.1.submodule.0"]
    _assert_only_these_frozen(plan, frozen_keys)


def test_vanilla_trains_every_weight():
    base, card = _base()
    plan = transfer.prepare("vanilla", None, None, base, card, TARGET_LABELS, 1, lr=1e-2)
    assert plan.frozen == [] and len(plan.param_groups) == 1
    before = _snapshot(plan.model)
    _train(plan)
    for key, value in plan.model.state_dict().items():
        assert not torch.equal(before[key], value), f"{key} did not train"


def test_two_stage_unfreezes_everything():
    base, card = _base()
    plan = transfer.prepare("two-stage", None, None, base, card, TARGET_LABELS, 1)
    params = list(plan.model.parameters())
    assert not all(p.requires_grad for p in params)
    optimizer = torch.optim.Adam(plan.param_groups)
    groups = transfer.unfreeze_all(plan.model, plan, optimizer)
    assert all(p.requires_grad for p in params)
    assert plan.stage == 2 and plan.frozen == [] and groups is plan.param_groups
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in params]
    assert groups[0]["lr"] == plan.lr
    in_optimizer = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in params)
    # The formerly frozen batch norm now learns its statistics again.
    before = _snapshot(plan.model)
    transfer.set_train_mode(plan.model)
    plan.model(torch.randn(2, 1, SIZE, SIZE, SIZE))
    assert not torch.equal(before["model.0.conv.unit0.adn.N.running_mean"],
                           plan.model.state_dict()["model.0.conv.unit0.adn.N.running_mean"])


def test_discriminative_puts_the_head_at_a_higher_learning_rate():
    base, card = _base()
    plan = transfer.prepare("discriminative", None, None, base, card, TARGET_LABELS, 1,
                            lr=1e-3, head_lr_factor=100.0)
    params = list(plan.model.parameters())
    grouped = [id(p) for group in plan.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in params)  # each in exactly one group
    assert all(p.requires_grad for p in params)
    lr_of = {id(p): group["lr"] for group in plan.param_groups for p in group["params"]}
    head = networks.head("unet", plan.model)
    assert lr_of[id(head.weight)] == pytest.approx(0.1)
    assert lr_of[id(head.bias)] == pytest.approx(0.1)
    stem = networks.encoder_blocks("unet", plan.model)[0]
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in stem.parameters())
    # The block before UNet's head holds the new label's fresh channel: it learns fast too.
    pre_head = networks.decoder_blocks("unet", plan.model)[-1]
    assert lr_of[id(pre_head.conv.weight)] == pytest.approx(0.1)


# --- head surgery ------------------------------------------------------------------------------

def test_head_surgery_copies_matched_labels_bit_exact():
    base, card = _base()
    model, report = surgery.head_surgery("unet", base, BASE_LABELS, TARGET_LABELS,
                                          arguments=card.arguments, keep_background=True)
    assert report.kept == [("background", 0, 0), ("kidney", 3, 1), ("liver", 1, 3)]
    assert report.new == ["pancreas"] and report.dropped == ["spleen"]
    assert "reused 3 of 4 target labels" in report.text() and "liver (1->3)" in report.text()

    old, new = base.state_dict(), model.state_dict()
    pre = "model.2.0."  # ConvTranspose3d (out-channel axis 1) + batch norm: one channel per label
    for name, b, t in report.kept:
        assert torch.equal(new[pre + "conv.weight"][:, t], old[pre + "conv.weight"][:, b]), name
        for suffix in ("conv.bias", "adn.N.weight", "adn.N.bias", "adn.N.running_mean",
                       "adn.N.running_var"):
            assert torch.equal(new[pre + suffix][t], old[pre + suffix][b]), (name, suffix)
    head = "model.2.1.conv.unit0.conv."  # Conv3d(labels -> labels): both axes follow the labels
    kept_old = [b for _, b, _ in report.kept]
    kept_new = [t for _, _, t in report.kept]
    for name, b, t in report.kept:
        assert torch.equal(new[head + "weight"][t][kept_new], old[head + "weight"][b][kept_old])
        assert torch.equal(new[head + "bias"][t], old[head + "bias"][b]), name
        assert torch.count_nonzero(new[head + "weight"][t][2]) == 0  # nothing from pancreas yet
    pancreas = new[pre + "conv.weight"][:, 2]
    assert not any(torch.equal(pancreas, old[pre + "conv.weight"][:, c]) for c in range(4))
    assert not torch.equal(new[head + "weight"][2][kept_new], old[head + "weight"][2][kept_old])
    for key in old:  # everything else untouched
        if key not in report.remapped:
            assert torch.equal(new[key], old[key]), key
    assert sorted(report.remapped) == sorted(k for k in old if k.startswith((pre, head))
                                             and not k.endswith(("A.weight", "tracked")))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, SIZE, SIZE, SIZE)).shape == (1, 4, SIZE, SIZE, SIZE)


def test_new_labels_give_a_fresh_background_and_known_ones_keep_it():
    """The base's background means "none of its labels": with a label new to the base it is
    initialised afresh; with only known labels it is copied."""
    base, card = _base("segresnet")
    head = "conv_final.2.conv."
    model, report = surgery.head_surgery("segresnet", base, BASE_LABELS, TARGET_LABELS,
                                          arguments=card.arguments, seed=3)
    assert [name for name, _, _ in report.kept] == ["kidney", "liver"]
    assert report.new == ["background", "pancreas"]
    old, new = base.state_dict(), model.state_dict()
    assert not torch.equal(new[head + "weight"][0], old[head + "weight"][0])
    assert torch.equal(new[head + "weight"][1], old[head + "weight"][3])  # kidney, bit-exact
    known = {0: "background", 1: "kidney", 2: "liver"}
    model, report = surgery.head_surgery("segresnet", base, BASE_LABELS, known,
                                          arguments=card.arguments)
    assert report.kept[0] == ("background", 0, 0) and report.new == []
    assert torch.equal(model.state_dict()[head + "weight"][0], old[head + "weight"][0])


def test_new_label_channels_start_at_their_share_of_the_training_voxels():
    """Fresh channels' output biases become the log of their share of the annotated voxels;
    kept labels keep the base's bias; a case that does not annotate a channel is not counted
    for it; a channel with no voxels keeps its start; and the new network predicts the rare
    channel rarely from the first step."""
    from types import SimpleNamespace

    import numpy as np

    base, card = _base()
    plan = transfer.prepare("discriminative", "unet", card.arguments, base, card, TARGET_LABELS,
                            1, seed=0)
    new_card = ModelCard(architecture="unet", in_channels=1, out_channels=4,
                         labels=dict(TARGET_LABELS), spacing=[1.0] * 3, patch_size=[SIZE] * 3,
                         normalisation={"kind": "none"}, arguments=card.arguments)
    head = networks.head("unet", plan.model)
    before = head.bias.detach().clone()
    first = np.zeros((SIZE,) * 3, np.int16)  # background, kidney, pancreas, liver
    first[:2] = 1
    first[2:3] = 2
    first[3:8] = 3
    first[15] = -1  # padding: in no share
    second = np.zeros((SIZE,) * 3, np.int16)  # draws no pancreas: its voxels are not counted
    cases = [SimpleNamespace(target=first, annotated=np.ones(4, bool)),
             SimpleNamespace(target=second, annotated=np.array([True, True, False, True]))]
    shares = transfer.start_at_prior(plan, new_card, cases)
    assert shares == pytest.approx({"background": (7 + 16) / 31, "pancreas": 1 / 15})
    assert head.bias[0].item() == pytest.approx(np.log((7 + 16) / 31))
    assert head.bias[2].item() == pytest.approx(np.log(1 / 15))
    assert torch.equal(head.bias[[1, 3]], before[[1, 3]])  # kidney and liver: the base's

    torch.manual_seed(0)
    scratch = transfer.prepare("scratch", "unet", card.arguments, None, None, TARGET_LABELS, 1)
    rare = np.zeros((SIZE,) * 3, np.int16)
    rare[:4] = 1
    rare[4, :2] = 2  # 32 of 4,096 voxels; no liver at all
    start = networks.head("unet", scratch.model).bias.detach().clone()
    shares = transfer.start_at_prior(scratch, new_card,
                                     [SimpleNamespace(target=rare, annotated=np.ones(4, bool))])
    assert set(shares) == {"background", "kidney", "pancreas"}
    assert networks.head("unet", scratch.model).bias[3] == start[3]
    with torch.no_grad():
        scratch.model.eval()
        mean = scratch.model(torch.randn(1, 1, SIZE, SIZE, SIZE)).softmax(1).mean((0, 2, 3, 4))
    assert mean[2] < 0.05 and mean[2] < mean[1] < mean[0]  # liver, no voxels: its own start
    unchanged = transfer.prepare("vanilla", "unet", card.arguments, base, card, BASE_LABELS, 1)
    assert transfer.start_at_prior(unchanged, card, cases) == {}  # no new channel


def test_head_surgery_with_the_same_labels_gives_the_same_model():
    base, card = _base()
    same = {0: "Background", 1: "Liver", 2: "spleen", 3: "KIDNEY"}  # names match ignoring case
    model, report = surgery.head_surgery("unet", base, BASE_LABELS, same,
                                          arguments=card.arguments)
    assert report.new == [] and report.dropped == [] and report.reinitialised == []
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))


@pytest.mark.parametrize("num_res_units", [0, 2])
def test_adding_a_label_keeps_the_logits_of_the_kept_ones(num_res_units):
    base, card = _base(num_res_units=num_res_units)
    target = {0: "background", 1: "pancreas", 2: "kidney", 3: "spleen", 4: "liver"}
    model, report = surgery.head_surgery("unet", base, BASE_LABELS, target,
                                          arguments=card.arguments, keep_background=True)
    if num_res_units == 0:  # the head is a ConvTranspose3d: labels on weight axis 1
        assert report.remapped == ["model.2.conv.bias", "model.2.conv.weight"]
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        out, reference = model.eval()(x), base(x)
    assert out.shape[1] == 5
    for _, b, t in report.kept:
        torch.testing.assert_close(out[:, t], reference[:, b], rtol=0, atol=1e-5)


def test_head_surgery_on_a_1x1_head_keeps_logits_even_when_dropping_labels():
    base, card = _base("segresnet")
    target = {0: "background", 1: "kidney", 2: "pancreas"}
    model, report = surgery.head_surgery("segresnet", base, BASE_LABELS, target,
                                          arguments=card.arguments, keep_background=True)
    assert report.dropped == ["liver", "spleen"]
    assert sorted(report.remapped) == ["conv_final.2.conv.bias", "conv_final.2.conv.weight"]
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        out, reference = model.eval()(x), base(x)
    torch.testing.assert_close(out[:, [0, 1]], reference[:, [0, 3]], rtol=0, atol=1e-6)


def test_head_surgery_refuses_a_model_that_is_not_the_card_s_network():
    base, _ = _base()
    with pytest.raises(InputError, match="not the network"):
        surgery.head_surgery("unet", base, BASE_LABELS, TARGET_LABELS,
                              arguments=_arguments(channels=[4, 8, 32]))


# --- input channels ----------------------------------------------------------------------------

@pytest.mark.parametrize(("base_in", "new_in"), [(1, 3), (2, 3)])
def test_input_adaptation_gives_the_base_output_for_a_repeated_image(base_in, new_in):
    base, card = _base(in_channels=base_in)
    model, report = surgery.adapt_input_channels("unet", base, base_in, new_in,
                                                  arguments=card.arguments)
    assert report.adapted == ["model.0.conv.unit0.conv.weight", "model.0.residual.weight"]
    assert model.state_dict()["model.0.residual.weight"].shape[1] == new_in
    image = torch.randn(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        out = model.eval()(image.repeat(1, new_in, 1, 1, 1))
        reference = base(image.repeat(1, base_in, 1, 1, 1))
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert f"{base_in} -> {new_in}" in report.text()


def test_prepare_adapts_channels_and_labels_together():
    base, card = _base()
    plan = transfer.prepare("vanilla", None, None, base, card, TARGET_LABELS, 2, seed=3)
    again = transfer.prepare("vanilla", None, None, base, card, TARGET_LABELS, 2, seed=3)
    x = torch.randn(1, 2, SIZE, SIZE, SIZE)
    with torch.no_grad():
        out = plan.model.eval()(x)
        assert out.shape == (1, 4, SIZE, SIZE, SIZE)
        assert torch.equal(out, again.model.eval()(x))  # the seed fixes the new channels
    assert "input channels 1 -> 2" in plan.report and "pancreas" in plan.report
    entry = plan.lineage()
    assert json.loads(json.dumps(entry)) == entry
    assert entry["new_labels"] == ["background", "pancreas"]


# --- scratch and errors ------------------------------------------------------------------------

def test_scratch_needs_no_base_and_ignores_its_weights():
    plan = transfer.prepare("scratch", "unet", _arguments(), None, None, TARGET_LABELS, 1)
    assert plan.head_report is None and plan.frozen == []
    with torch.no_grad():
        assert plan.model(torch.randn(1, 1, SIZE, SIZE, SIZE)).shape[1] == 4
    base, card = _base()
    from_base = transfer.prepare("scratch", None, None, base, card, BASE_LABELS, 1)
    assert from_base.arguments == card.arguments
    stem = "model.0.conv.unit0.conv.weight"
    assert not torch.equal(from_base.model.state_dict()[stem], base.state_dict()[stem])


def test_errors_name_the_problem():
    base, card = _base()
    with pytest.raises(InputError, match="known: scratch, vanilla, finetune, finetune-last, "
                                         "discriminative, two-stage"):
        transfer.prepare("fine-tune", None, None, base, card, TARGET_LABELS, 1)
    for strategy in ("vanilla", "finetune", "discriminative", "two-stage"):
        with pytest.raises(InputError, match="base model"):
            transfer.prepare(strategy, "unet", None, None, None, TARGET_LABELS, 1)
    with pytest.raises(InputError, match="needs an architecture"):
        transfer.prepare("scratch", None, None, None, None, TARGET_LABELS, 1)
    for depth in (-1, 4, True, 1.5):
        with pytest.raises(InputError, match="from 0 to 3"):
            transfer.prepare("finetune", None, None, base, card, TARGET_LABELS, 1,
                             freeze_depth=depth)
    with pytest.raises(InputError, match="freeze_depth applies to"):
        transfer.prepare("vanilla", None, None, base, card, TARGET_LABELS, 1, freeze_depth=1)
    with pytest.raises(InputError, match="no background at channel 0"):
        transfer.prepare("vanilla", None, None, base, card, {1: "liver", 2: "kidney"}, 1)
    with pytest.raises(InputError, match="without gaps"):
        transfer.prepare("vanilla", None, None, base, card, {0: "background", 2: "liver"}, 1)
    with pytest.raises(InputError, match="not a segresnet"):
        transfer.prepare("vanilla", "segresnet", None, base, card, TARGET_LABELS, 1)
    with pytest.raises(InputError, match="arguments differ"):
        transfer.prepare("vanilla", None, {"channels": [4, 8, 32]}, base, card, TARGET_LABELS, 1)
