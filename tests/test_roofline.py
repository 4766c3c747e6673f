"""The roofline cost model (issue 26, added through the budget spec of issue 25: one new file and one
entry in the table of cost models): its time matches a hand computation, fused runs are cheaper than
eager ones, and latency budgets and latency-weighted widths work with it as with a measured table."""

from __future__ import annotations

import io
import json

import pytest
import torch
from tests.nets import TinyResNet, tiny_chase, train_step
from torch import nn

import chase
from chase import Budget, ChannelSpec
from chase.sparsifier import specs
from chase.sparsifier.costs import COST_SOURCES
from chase.sparsifier.roofline import DEVICES, Device, Roofline, measure_device

EXAMPLE = torch.randn(2, 3, 16, 16)


def test_the_time_of_a_linear_layer_is_the_roofline_by_hand():
    """One kernel (a matrix product): max(FLOPs / peak, bytes / bandwidth) + launch, at the batch asked."""
    device = Device("toy", "cpu", "fp32", 1e9, 1e8, 1e-5, 1e-6, compute_efficiency=1.0, memory_efficiency=1.0)
    model = nn.Linear(100, 50, bias=False)
    x = torch.zeros(1, 100)
    for batch in (1, 64):
        flops = 2 * batch * 100 * 50
        moved = 4 * (batch * 100 + 100 * 50 + batch * 50)  # input, weight, output in fp32
        want = max(flops / 1e9, moved / 1e8) + 1e-5
        got = Roofline(device, fused=False, batch_size=batch).predict_ms(model, x)
        assert got == pytest.approx(1e3 * want, rel=1e-9)


def _compute_bound(tile: int) -> Device:
    return Device(
        "toy", "cpu", "fp32", 1e9, 1e18, 0.0, 0.0, tile, compute_efficiency=1.0, memory_efficiency=1.0
    )


@pytest.mark.parametrize(
    "layer, x, flops, padded",
    [  # (FLOPs, FLOPs at a tile of 8): both weight dims of a product, a convolution's out and in channels,
        # a depthwise convolution's channels but not its one input channel per group
        (nn.Linear(100, 50, bias=False), torch.zeros(1, 100), 2 * 100 * 50, 2 * 104 * 56),
        (
            nn.Conv2d(20, 10, 3, bias=False),
            torch.zeros(1, 20, 8, 8),
            2 * 10 * 20 * 9 * 36,
            2 * 16 * 24 * 9 * 36,
        ),
        (
            nn.Conv2d(20, 20, 3, groups=20, bias=False),
            torch.zeros(1, 20, 8, 8),
            2 * 20 * 9 * 36,
            2 * 24 * 9 * 36,
        ),
        (
            nn.ConvTranspose2d(12, 20, 1, bias=False),
            torch.zeros(1, 12, 4, 4),
            2 * 12 * 20 * 16,
            2 * 16 * 24 * 16,
        ),
    ],
)
def test_a_devices_tile_rounds_up_the_channels_a_weighted_kernel_computes(layer, x, flops, padded):
    """Kernels compute whole tiles of channels: 50 channels cost what 56 do at a tile of 8."""
    for tile, want in ((1, flops), (8, padded)):
        got = Roofline(_compute_bound(tile), fused=False, batch_size=1).predict_ms(layer.eval(), x)
        assert got == pytest.approx(1e3 * want / 1e9, rel=1e-9), tile


def test_at_the_tile_a_narrower_unaligned_width_saves_nothing_and_an_aligned_one_does():
    roof = Roofline(_compute_bound(16), fused=True, batch_size=8)
    x = torch.zeros(1, 64, 8, 8)
    time = {c: roof.predict_ms(nn.Conv2d(64, c, 3, bias=False).eval(), x) for c in (64, 54, 49, 48)}
    assert time[64] == time[54] == time[49] > time[48]


def test_a_fusing_runtime_costs_less_than_eager_and_folds_batchnorm():
    model = TinyResNet(width=16).eval()
    x = EXAMPLE[:1]
    for name in ("h200", "t4"):
        eager = Roofline(name, fused=False, batch_size=8).predict_ms(model, x)
        fused = Roofline(name, fused=True, batch_size=8).predict_ms(model, x)
        assert fused < eager
    # Under fusion BatchNorm costs nothing: a model without its norms takes the same time.
    plain = TinyResNet(width=16).eval()
    for n in ("bn1", "bn_a", "bn_b", "bn2"):
        setattr(plain, n, nn.Identity())
    fused = Roofline("h200", batch_size=8)
    assert fused.predict_ms(plain, x) == pytest.approx(fused.predict_ms(model, x), rel=1e-9)
    eager = Roofline("h200", fused=False, batch_size=8)
    assert eager.predict_ms(plain, x) < eager.predict_ms(model, x)


@pytest.mark.parametrize(
    "text, fused, batch",
    [("h200", True, 32), ("a100:eager", False, 32), ("t4:fused@1", True, 1), ("H100@256", True, 256)],
)
def test_a_roofline_option_names_device_mode_and_batch(text, fused, batch):
    r = Roofline.parse(text)
    assert (r.fused, r.batch_size) == (fused, batch) and r.device in DEVICES.values()


@pytest.mark.parametrize(
    "text, words",
    [
        ("h300", "unknown roofline device"),
        ("h200:lazy", "must be fused or eager"),
        ("h200@big", "must be an integer"),
        ("h200@0", "batch_size must be an integer >= 1"),
        (3, "must be DEVICE"),
    ],
)
def test_bad_rooflines_are_refused(text, words):
    with pytest.raises(ValueError, match=words):
        Roofline.parse(text)


def test_a_measured_device_file_is_a_roofline(tmp_path):
    device = measure_device("cpu", repeats=3)
    assert device.kind == "cpu" and device.flops > 1e8 and device.bandwidth > 1e8 and device.launch_eager > 0
    assert device.tile in (1, 2, 4, 8, 16, 32, 64) and f"channel tile {device.tile}" in device.source
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"device": device.__dict__}))
    r = Roofline.parse(f"{path}@16")
    assert r.device == device and r.batch_size == 16
    bad = {
        "empty.json": "{}",
        "list.json": "[1, 2]",
        "string.json": '"h200"',
        "negative.json": json.dumps({"device": {**device.__dict__, "flops": -1}}),
        "tile.json": json.dumps({"device": {**device.__dict__, "tile": -8}}),
    }
    for name, text in {**bad, "binary.json": None}.items():
        path = tmp_path / name
        path.write_bytes(bytes(range(128, 256))) if text is None else path.write_text(text)
        with pytest.raises(ValueError, match=rf"{name} is not a (usable )?roofline device file") as e:
            Roofline(path)
        assert "\n" not in str(e.value)


def test_the_predicted_time_does_not_depend_on_the_examples_batch():
    """The roofline's batch is its own: an example of 1 or of 8 gives the same time and the same widths."""
    r = Roofline(TOY, batch_size=8)
    model = TinyResNet(width=16)
    assert r.predict_ms(model, EXAMPLE[:1]) == r.predict_ms(model, torch.randn(8, 3, 16, 16))
    kept = []
    for batch in (1, 8):
        torch.manual_seed(0)
        model = TinyResNet(width=16)
        chase.prune_channels(model, torch.randn(batch, 3, 16, 16), budget=Budget.latency(0.6, r))
        kept.append([p.shape for p in model.parameters()])
    assert kept[0] == kept[1]


def test_the_roofline_is_in_the_table_of_cost_models_and_so_everywhere():
    assert COST_SOURCES["roofline"].type is Roofline
    assert "roofline" in specs.flat_options()
    _, budget = specs.specs_from_flat({"latency_ratio": 0.5, "roofline": "h200@8"})
    assert budget == Budget.latency(0.5, Roofline("h200", batch_size=8))


#: a device on which TinyResNet's time is its work, not its launches (a real GPU runs it launch-bound: no
#: width reaches 0.6 of its time there, and the budget warns so).
TOY = Device("toy", "cuda", "bf16", 1e12, 1e10, 1e-8, 1e-9, tile=8)


@pytest.mark.parametrize("fused", [True, False])
def test_chase_meets_a_roofline_latency_budget_at_the_devices_tile(fused):
    roof = Roofline(TOY, fused=fused, batch_size=64)
    model, opt, sp = tiny_chase(
        EXAMPLE, channels=ChannelSpec(channel_sparsity=0.5, prune_skip=True), budget=Budget.latency(0.6, roof)
    )
    assert sp.channels.channel_multiple == 8  # the device's tile, as channel_multiple was left unset
    dense = roof.predict_ms(model, EXAMPLE[:1])
    assert sp.pruner.cost.dense_ms == pytest.approx(dense)
    for i in range(40):
        train_step(model, opt, sp, i)
    got = roof.predict_ms(model, EXAMPLE[:1])
    assert got <= 0.6 * dense + 1e-9 and got == pytest.approx(sp.predicted_ms())
    widths = sp.alive_channels()
    assert all(w % 8 == 0 or w == g.width for g, w in zip(sp.groups, widths.values()))
    assert sp.channel_sparsity_now() > 0


def test_latency_weighted_widths_by_a_roofline_resume_in_lockstep():
    """Under a MACs budget the roofline weighs the groups (memory-bound high-resolution layers give
    more); its weights and itself are in the state, so a resume ends as the whole run."""
    options = {
        "channels": ChannelSpec(channel_rank="latency_weighted", prune_skip=True, channel_multiple=1),
        "budget": Budget.macs(0.6, Roofline("t4", fused=False, batch_size=16)),
    }
    model, opt, sp = tiny_chase(EXAMPLE, **options)
    assert sp.pruner.rank_weights is not None and len(set(sp.pruner.rank_weights)) > 1
    for i in range(40):
        train_step(model, opt, sp, i)
    model_a, opt_a, sp_a = tiny_chase(EXAMPLE, **options)
    for i in range(14):
        train_step(model_a, opt_a, sp_a, i)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sp": sp_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["sp"]["cost"]["source"] == "roofline"
    model_b, opt_b, sp_b = tiny_chase(EXAMPLE, **options)
    sp_b.load_state_dict(saved["sp"])
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    for i in range(14, 40):
        train_step(model_b, opt_b, sp_b, i)
    assert sp_b.pruner.cost == sp.pruner.cost and sp_b.alive_channels() == sp.alive_channels()
    for (n, w), w_b in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(w, w_b), n


def test_a_launch_bound_budget_warns_that_it_is_not_reached():
    model = TinyResNet(width=32)
    with pytest.warns(UserWarning, match="latency budget not reached"):
        chase.prune_channels(
            model,
            EXAMPLE,
            channels=ChannelSpec(prune_skip=True),
            budget=Budget.latency(0.5, Roofline("h200")),
        )


def test_prune_channels_and_the_cli_take_a_roofline(capsys):
    from chase.cli import main

    model = TinyResNet(width=32)
    roof = Roofline(TOY, batch_size=32)
    dense = roof.predict_ms(model, EXAMPLE[:1])
    chase.prune_channels(
        model, EXAMPLE, channels=ChannelSpec(prune_skip=True), budget=Budget.latency(0.5, roof)
    )
    assert roof.predict_ms(model, EXAMPLE[:1]) <= 0.5 * dense
    argv = ["flops", "-m", "cifar_resnet20", "--num-classes", "10", "--input", "32"]
    assert main([*argv, "--latency-ratio", "0.5", "--roofline", "h200@64", "--prune-skip"]) == 0
    out = capsys.readouterr().out
    assert "roofline" in out and "channel_multiple" not in out.split("slim =")[1].split(",")[0]


@pytest.mark.parametrize("multiple", [None, 1])
def test_a_budget_at_a_tile_stops_at_its_target_and_does_not_empty_the_model(multiple):
    """A channel's saving is counted over a tile: one channel of 64 at a tile of 16 saves no compute, and
    savings counted one channel at a time made the budget remove nearly everything (ResNet-50 went to
    0.03 of its MACs at a latency budget of 0.5)."""
    roof = Roofline(_compute_bound(16), fused=True, batch_size=8)
    torch.manual_seed(0)
    model = TinyResNet(width=64)
    dense = roof.predict_ms(model, EXAMPLE[:1])
    chase.prune_channels(
        model,
        EXAMPLE,
        channels=ChannelSpec(prune_skip=True, channel_multiple=multiple),
        budget=Budget.latency(0.5, roof),
    )
    assert 0.35 * dense <= roof.predict_ms(model, EXAMPLE[:1]) <= 0.5 * dense
