"""FLOPs counting, training-FLOPs accounting, and the ``chase flops / bench / analyze`` commands (CPU)."""

from __future__ import annotations

import copy
import json
import pathlib
import warnings

import pytest
import torch
from tests.nets import TINY_CHASE_RUN as TINY
from torch import nn

import chase
from chase.cli import build_parser, main
from chase.flops import StepCost, count_flops, training_flops
from chase.models import get_model
from chase.sparsifier.one_shot import untrained_label, untrained_slim

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- hand counts
@pytest.mark.parametrize(
    "layer, shape, macs",
    [
        # 9x9, k3 s2 p1 -> 5x5 outputs; 8*3*3*3 = 216 weights: 25 * 216
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 9, 9), 5400),
        # grouped: 7x7, k3 p0 -> 5x5; weight 16 x (8/4) x 3 x 3 = 288: 25 * 288
        (nn.Conv2d(8, 16, 3, groups=4), (1, 8, 7, 7), 7200),
        # depthwise: 6x6, p1 -> 6x6; weight 8 x 1 x 3 x 3 = 72: 36 * 72
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (3, 8, 6, 6), 2592),
        # stride 2, dilation 2: 11 -> (11 - 5) // 2 + 1 = 4 per side; 16 * 4*2*9 = 16 * 72
        (nn.Conv2d(2, 4, 3, stride=2, dilation=2), (1, 2, 11, 11), 1152),
        # 1-D: length 12, k5 -> 8; weight 6 x 4 x 5 = 120
        (nn.Conv1d(4, 6, 5), (2, 4, 12), 960),
        # 3-D: 4x5x5, k(1,3,3) -> 4x3x3 = 36; weight 3 x 2 x 9 = 54
        (nn.Conv3d(2, 3, (1, 3, 3)), (1, 2, 4, 5, 5), 1944),
        (nn.Linear(10, 4), (5, 10), 40),
        (nn.Linear(10, 4), (5, 3, 10), 120),  # a sequence of 3 tokens: each weight used 3 times
    ],
)
def test_hand_counted_layers(layer, shape, macs):
    report = count_flops(layer, torch.zeros(shape))
    assert report.dense == report.sparse == macs
    assert report.layers[0].name == "weight"


def test_masks_reference_and_model_unchanged():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    net.train()
    x = torch.zeros(2, 3, 4, 4)
    dense = count_flops(net, x)
    assert [s.name for s in dense.layers] == ["0.weight", "3.weight"]
    assert dense.dense == 16 * 216 + 1280  # conv: 4x4 outputs x 216 weights; linear 128 x 10
    # Masking half of the conv's weights halves its sparse MACs; the dense count is unchanged.
    half = torch.zeros(8, 3, 3, 3, dtype=torch.bool)
    half[:4] = True
    sparse = count_flops(net, x, {"0.weight": half})
    assert sparse.layers[0].sparse == 16 * 216 // 2 and sparse.layers[1].sparse == 1280
    assert sparse.dense == dense.dense and sparse.sparse == dense.dense - 16 * 108
    # Hooks are gone and the training mode is back.
    assert net.training and all(not m._forward_hooks for m in net.modules())
    # A half-width slim model against its dense reference: GPU-supported ratio.
    slim = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    r = count_flops(slim, x, reference=net)
    assert r.reference_dense == dense.dense
    assert r.dense_ratio == pytest.approx((16 * 108 + 640) / dense.dense)
    assert json.loads(json.dumps(r.as_dict()))["dense"] == r.dense


def test_resnet50_dense_macs():
    torchvision = pytest.importorskip("torchvision")
    report = count_flops(torchvision.models.resnet50(weights=None), torch.zeros(1, 3, 224, 224))
    assert report.dense == pytest.approx(4.09e9, rel=0.01)  # 4,089,184,256: the known 4.1 GMACs
    assert len(report.layers) == 54  # 53 convs + fc


def test_training_flops_hand_counted():
    # Four steps at forward density 0.5 of 100 MACs, updates every 2 steps: 3*50 + (2*50 + 100) twice.
    log = [(0.5, 100.0)] * 4
    r = training_flops(log, update_every=2, batch_size=2)
    assert (r.total, r.dense_total, r.update_steps) == (2 * 700, 2 * 1200, 2)
    assert r.ratio == pytest.approx(700 / 1200)
    # No update at or after end_step (the engine's schedule): step 4 is a plain step.
    assert training_flops(log, update_every=2, end_step=4).total == 650
    # Shrinking width (Chase) and an explicit update flag; dense training is priced at the first width.
    r = training_flops([StepCost(0.6, 100.0), StepCost(0.5, 80.0, update=True)])
    assert (r.total, r.dense_total, r.update_steps) == (3 * 60 + 2 * 40 + 80, 600, 1)


# ------------------------------------------------------------------------------------------ commands
@pytest.fixture(scope="module")
def chase_run(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("yaml")
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "-q", "--out", str(out), "--set", *TINY]) == 0
    return out / "chase"


def test_stubs_are_gone():
    assert "measurement issue" not in pathlib.Path(chase.cli.__file__).read_text()
    assert "measurement issue" not in build_parser().format_help()


def test_flops_command_model_name(tmp_path, capsys):
    out = tmp_path / "f.json"
    args = ["flops", "--model", "cifar_resnet20", "--num-classes", "10", "--input", "32"]
    assert main([*args, "--channel-sparsity", "0.5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GMACs" in text and "dense" in text and "GPU-supported (slim)" in text and "UNTRAINED" in text
    d = json.loads(out.read_text())
    assert d["dense"] == 40_813_184  # CIFAR ResNet-20, 10 classes, 32x32: 40.8 MMACs
    assert d["sparse"] == d["dense"] and 0.3 < d["gpu_supported_ratio"] < 1.0


def test_untrained_width_is_chosen_on_masked_weights():
    """chase flops/bench --channel-sparsity pick the channels Chase would pick at its first event: UMM of
    the initial weights masked at density d, not of the dense weights."""
    torch.manual_seed(0)
    dense = get_model("cifar_vgg16_bn", num_classes=10).eval()
    x = torch.zeros(1, 3, 32, 32)

    def widths(model):
        return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    work = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = chase.Chase(
            work, torch.optim.SGD(work.parameters(), lr=0.0), density=0.1, soft_bound=0.0, total_steps=6,
            example_inputs=x, channel_sparsity=0.5, update_every=2, channel_every=1, channel_end=2,
        )  # fmt: skip
    sp.remove_channels_now(sp.last_event)
    slim = untrained_slim(dense, x, 0.5)
    assert widths(slim) == widths(sp.export())
    assert widths(untrained_slim(dense, x, 0.5, density=1.0)) != widths(slim)  # the choice depends on d
    assert "masked at density 0.1" in untrained_label(chase.ChannelSpec(channel_sparsity=0.5))


def test_untrained_width_bad_density(capsys):
    args = ["flops", "--model", "cifar_resnet20", "--num-classes", "10", "--input", "32"]
    assert main([*args, "--channel-sparsity", "0.5", "--density", "1.5"]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err


def test_flops_command_on_run(chase_run, tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["flops", str(chase_run), "--layers", "--json", str(out)]) == 0
    assert "sparse (kept weights)" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["method"] == "chase" and d["input"] == [3, 8, 8]
    assert d["sparse_ratio"] < d["gpu_supported_ratio"] < 1.0


def test_bench_command(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "cifar_resnet20", "--num-classes", "10", "--input", "8"]
    args += ["--channel-sparsity", "0.5", "--batch-sizes", "1,4", "--repeats", "2", "--warmup", "1"]
    assert main([*args, "--dtypes", "fp32,fp16", "--device", "cpu", "--json", str(out)]) == 0
    assert "images/s" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["meta"]["torch"] == torch.__version__ and d["meta"]["date"] and d["meta"]["device"] == "cpu"
    assert d["meta"]["slim"].startswith("UNTRAINED")
    rows = d["results"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("dense", 1),
        ("slim", 1),
        ("dense", 4),
        ("slim", 4),
    ]
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["latency_ms"] > 0 and r["throughput"] > 0
    assert rows[1]["speedup"] > 0 and rows[1]["flops_ratio"] > 1.0
    # fp16 on CPU: skipped with a note (at every batch size), not faked
    assert {s["dtype"] for s in d["skipped"]} == {"fp16"} and "CUDA only" in d["skipped"][0]["reason"]


def test_analyze_command(chase_run, capsys):
    assert main(["analyze", str(chase_run)]) == 0
    text = capsys.readouterr().out
    assert "sparse amenable" in text and "layer1.0.conv1.weight" in text
    png = chase_run / "channel_density.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commands_report_user_errors(tmp_path, capsys):
    assert main(["flops"]) == 2
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_compiled_is_frozen_and_matches_eager():
    from chase.bench import benchmark
    from chase.deploy import deploy

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)
    )
    model[1].running_mean.uniform_(-1, 1)  # non-trivial statistics, so a wrong BatchNorm fold shows
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    deployed = deploy(model, x, backend="inductor")
    compiled = deployed.keep[0]
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)
    before = deployed(x)
    with torch.no_grad():
        compiled._orig_mod[4].weight.zero_()  # frozen: the compiled graph holds its weights as constants
    torch.testing.assert_close(deployed(x), before)
    d = benchmark({"m": model}, (3, 8, 8), batch_sizes=(2,), compiled=(True,), warmup=1, repeats=2)
    assert not d["skipped"] and [r["compiled"] for r in d["results"]] == [True]


def test_bench_compiles_every_model_past_dynamos_recompile_limit():
    """Nine models of one class compiled in one process: past Dynamo's default limit of 8 entries per
    forward code the ninth ran eager under a "compiled" label. Every one must be compiled."""
    from torch._dynamo.utils import counters

    from chase.bench import benchmark

    torch._dynamo.reset()
    models = {f"m{i}": nn.Sequential(nn.Linear(8, 8 + i), nn.ReLU()).eval() for i in range(9)}
    before = counters["frames"]["ok"]
    d = benchmark(models, (8,), batch_sizes=(2,), compiled=(True,), warmup=1, repeats=1)
    assert not d["skipped"] and len(d["results"]) == 9
    assert counters["frames"]["ok"] - before >= 9


def test_check_command(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert (
        main(["check", "--model", "cifar_resnet20", "--input", "16", "--prune-skip", "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "pass:" in text and "reloaded slim model matches" in text
    report = json.loads(out.read_text())
    assert report["status"] == "pass" and report["params_slim"] < report["params_dense"]
    assert main(["check", "--model", "cifar_resnet_20"]) == 2
    assert "unknown model name" in capsys.readouterr().err


@pytest.mark.parametrize("name, published", [("vit_b_16", 17.56), ("swin_t", 4.49), ("resnet50", 4.09)])
def test_transformers_are_counted_as_torchvision_publishes(name, published):
    """Attention matmuls and nn.MultiheadAttention's functional projections count too (torchvision's
    model cards give GMACs at 224 under the name GFLOPS)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name).eval()
    report = count_flops(model, torch.zeros(1, 3, 224, 224))
    assert report.dense / 1e9 == pytest.approx(published, abs=0.01)
    assert torch.backends.mha.get_fastpath_enabled()  # the fast path is switched back on
