"""ONNX export of slim models, the onnxruntime check, and ``chase export/bench --onnx`` (CPU, seconds)."""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import sys

import pytest
import torch
from tests.nets import TINY_CHASE_RUN as TINY
from tests.nets import TinyResNet, make_optimizer, train_step

import chase
from chase.cli import main
from chase.models import get_model
from chase.onnx import OnnxCheckError, check_onnx, export_onnx, onnx_runner, onnx_throughput

ort = pytest.importorskip("onnxruntime")  # a guard only: the test extra installs it, so CI runs these
onnx = pytest.importorskip("onnx")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def slim() -> torch.nn.Module:
    """A real slim model: TinyResNet after Chase's channel events, physically narrowed, exported."""
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = chase.Chase(
        model,
        opt,
        density=0.3,
        total_steps=24,
        example_inputs=torch.randn(2, 3, 16, 16),
        channel_sparsity=0.5,
        update_every=4,
        channel_every=4,
        prune_skip=True,
        seed=0,
    )
    for i in range(12):
        train_step(model, opt, sp, i)
    out = sp.export()
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in TinyResNet().parameters())
    return out


@pytest.fixture(scope="module")
def slim_onnx(slim, tmp_path_factory) -> pathlib.Path:
    return export_onnx(slim, torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("onnx") / "slim.onnx")


def test_round_trip_at_two_batch_sizes(slim, slim_onnx):
    # The export left the model's mode alone (it exports in eval mode and restores the flag).
    model = copy.deepcopy(slim).train()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), slim_onnx.with_name("again.onnx"))
    assert model.training
    # The batch axis is symbolic in the file, not the example's 1 (or the 2 the exporter traced with).
    graph = onnx.load(str(slim_onnx)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param
    x = torch.randn(3, 3, 16, 16)
    res = check_onnx(slim_onnx, slim.eval(), x, other_batch=5)
    assert res["batch_sizes"] == [3, 5] and res["onnxruntime"] == ort.__version__
    assert res["max_abs_diff"] <= 1e-5 + 1e-4 * res["max_abs_output"] and res["max_abs_output"] > 0
    assert res["relative_diff"] < 1e-5  # fp32 rounding only
    # The same numbers by hand at two more batch sizes, from both files.
    for p in (slim_onnx, path):
        for n in (1, 7):
            x = torch.randn(n, 3, 16, 16)
            (got,) = onnx_runner(p)(x)
            with torch.no_grad():
                assert torch.allclose(torch.from_numpy(got), slim.eval()(x), atol=1e-5)


def test_check_fails_on_a_tampered_model(slim, slim_onnx):
    tampered = copy.deepcopy(slim).eval()
    with torch.no_grad():
        tampered.fc.bias[0] += 0.5  # the ONNX file still holds the old weights
    with pytest.raises(OnnxCheckError, match="differ by"):
        check_onnx(slim_onnx, tampered, torch.randn(2, 3, 16, 16))
    # Another output shape is caught too, not broadcast away.
    wider = TinyResNet(num_classes=12).eval()
    with pytest.raises(OnnxCheckError, match="shapes"):
        check_onnx(slim_onnx, wider, torch.randn(2, 3, 16, 16))


def test_failed_export_leaves_no_file_and_auto_falls_back(slim, tmp_path, monkeypatch):
    real = torch.onnx.export

    @functools.wraps(real)  # keeps the signature export_onnx reads to find torch's default exporter
    def half_then_fail(model, args, f, **kw):  # writes part of the file, then dies
        if kw.get("dynamo", True):
            pathlib.Path(f).write_bytes(b"partial")
            raise RuntimeError("exporter crashed")
        return real(model, args, f, **kw)

    monkeypatch.setattr(torch.onnx, "export", half_then_fail)
    target = tmp_path / "slim.onnx"
    with pytest.raises(RuntimeError, match="crashed"):
        export_onnx(slim, torch.randn(2, 3, 16, 16), target, exporter="dynamo")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="crashed"):
        export_onnx(slim, torch.randn(2, 3, 16, 16), target, exporter="dynamo")
    assert target.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [target]
    # "auto" falls back to the TorchScript exporter when the torch.export-based one fails.
    with pytest.warns(RuntimeWarning, match="TorchScript"):
        export_onnx(slim, torch.randn(2, 3, 16, 16), target)
    assert list(tmp_path.iterdir()) == [target]
    assert check_onnx(target, slim, torch.randn(2, 3, 16, 16))["max_abs_diff"] < 1e-5


def test_missing_onnx_says_what_to_install(slim, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(ModuleNotFoundError, match=r"chase-dst\[onnx\]"):
        export_onnx(slim, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_throughput_reports_latency(slim_onnx):
    r = onnx_throughput(slim_onnx, 4, (3, 16, 16), warmup=1, repeats=3, threads=1)
    assert r["backend"] == "onnxruntime" and r["batch_size"] == 4 and r["threads"] == 1
    assert 0 < r["latency_ms_min"] <= r["latency_ms"]
    assert r["throughput"] == pytest.approx(4 / (r["latency_ms"] / 1e3))


def test_cli_export_onnx(tmp_path, capsys):
    pytest.importorskip("yaml")
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *TINY]) == 0
    run = tmp_path / "chase"
    capsys.readouterr()
    assert main(["export", str(run), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "slim.onnx" in out and "matches PyTorch" in out and "max |diff|" in out
    assert (run / "slim.onnx").is_file() and (run / "slim.pt").is_file()
    # The file computes the slim model that chase.load_slim rebuilds from slim.pt.
    model = chase.load_slim(get_model("cifar_resnet20", 10), torch.load(run / "slim.pt", weights_only=True))
    x = torch.randn(3, 3, 8, 8)
    (got,) = onnx_runner(run / "slim.onnx")(x)
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model.eval()(x), atol=1e-4)
    # An explicit path.
    assert main(["export", str(run), "-o", str(tmp_path / "s.pt"), "--onnx", str(tmp_path / "x.onnx")]) == 0
    assert (tmp_path / "x.onnx").is_file() and (tmp_path / "s.pt").is_file()


def test_cli_bench_onnx_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "cifar_resnet20", "--num-classes", "10", "--input", "8", "--onnx"]
    args += ["--channel-sparsity", "0.5", "--batch-sizes", "1,4", "--repeats", "2", "--warmup", "1"]
    assert main([*args, "--dtypes", "fp32,bf16", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text
    d = json.loads(out.read_text())
    assert d["meta"]["backends"] == ["eager", "onnxruntime"]
    rows = [(r["model"], r["backend"], r["dtype"], r["batch_size"]) for r in d["results"]]
    for b in (1, 4):
        for m in ("dense", "slim"):
            assert (m, "eager", "fp32", b) in rows and (m, "onnxruntime", "fp32", b) in rows
            assert (m, "eager", "bf16", b) in rows and (m, "onnxruntime", "bf16", b) not in rows
    ort_slim = [r for r in d["results"] if r["backend"] == "onnxruntime" and r["model"] == "slim"]
    assert all(r["speedup"] > 0 and r["backend_speedup"] > 0 and r["flops_ratio"] > 1 for r in ort_slim)
    assert all(r["max_relative_diff"] < 1e-3 for r in d["results"] if r["backend"] == "onnxruntime")
    skipped = [s for s in d["skipped"] if s["backend"] == "onnxruntime"]
    assert {s["dtype"] for s in skipped} == {"bf16"} and "fp32 export" in skipped[0]["reason"]


def test_deployed_sessions_sleep_instead_of_spinning(slim):
    # Deployed models are timed in turn; an idle session's spinning pool would take the running one's cores.
    from chase.deploy import deploy

    d = deploy(slim, torch.randn(2, 3, 16, 16), backend="onnxruntime")
    sess = d.keep[-1]
    opts = sess.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == torch.get_num_threads() and d.info["spinning"] is False
