"""chase.deploy (issue 26): the model a user serves, under every backend, checked against eager, and a
backend that cannot run says why instead of running something else."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tests.nets import TinyResNet
from torch import nn

from chase.deploy import BACKENDS, Backend, DeployError, deploy, fold_batchnorm


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet(width=16)
    for m in model.modules():  # non-trivial statistics, so that a wrong BatchNorm fold shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


X = torch.randn(4, 3, 16, 16)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_backend_serves_the_eager_models_outputs(backend):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    d = deploy(model, X, backend=backend)
    assert d.backend == backend and d.info["device"] == "cpu" and d.info["dtype"] == "fp32"
    assert d.info["tf32"] is False and d.info["max_relative_diff"] < 1e-4 and d.info["batchnorm"]
    x = torch.randn(4, 3, 16, 16)
    got = d(x)
    got = got[0] if isinstance(got, list) else got
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched


def test_a_tolerance_of_zero_is_a_tolerance_and_a_negative_one_is_refused():
    model = _model()  # folding the BatchNorms changes the last bits: no fp32 output is identical
    assert deploy(model, X, tolerance=1e-3).info["max_relative_diff"] > 0
    with pytest.raises(DeployError, match=r"tolerance 0\)"):
        deploy(model, X, tolerance=0.0)
    for bad in (-0.1, float("nan"), "1%"):
        with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
            deploy(model, X, tolerance=bad)


def test_eager_folds_batchnorm_where_the_model_traces():
    model = _model()
    folded, note = fold_batchnorm(copy.deepcopy(model))
    assert note == "4 of 4 folded into their convolutions"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())

    class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it, the norms stay
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    kept, note = fold_batchnorm(Branchy().eval())
    assert note.startswith("not folded") and any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
    assert deploy(Branchy().eval(), X, backend="eager").info["batchnorm"].startswith("not folded")


def test_inductor_serves_other_batch_sizes_too():
    model = _model()
    d = deploy(model, X, backend="inductor")
    assert d.info["mode"] == "default" and d.info["cuda_graphs"] is False
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(d(x), model(x), rtol=1e-4, atol=1e-4)


def test_inductor_serving_compiles_nothing_more_for_inputs_made_in_or_out_of_inference_mode():
    """What was compiled (frozen) at deploy is what serves: an input made under inference_mode (the user's,
    or Deployed's own conversion to channels-last or another dtype) has other dispatch keys; it was
    recompiled at its first call, unfrozen, and past Dynamo's limit of 8 per model class, silently eager."""
    served = [deploy(_model(), X, backend="inductor", channels_last=i % 2 == 1) for i in range(9)]  # > 8
    with torch.compiler.set_stance("fail_on_recompile"):
        for d in served:
            with torch.inference_mode():
                inner = torch.randn(4, 3, 16, 16)
            d(inner)
            d(torch.randn(4, 3, 16, 16))
            with torch.no_grad():
                d(torch.randn(4, 3, 16, 16))
            d(torch.randn(4, 3, 16, 16, requires_grad=True))  # history is dropped, not compiled for
            d(torch.randn(4, 3, 16, 32)[..., ::2])  # strided: made contiguous in the served layout
            d(torch.randn(4, 3, 16, 16, dtype=torch.float64))


def test_openvino_says_its_precision():
    d = deploy(_model(), X, backend="openvino", dtype="bf16")
    assert d.info["inference_precision"] == "bf16" and d.info["max_relative_diff"] < 6e-2
    assert deploy(_model(), X, backend="openvino").info["inference_precision"] == "f32"


@pytest.mark.parametrize(
    "backend, dtype, device, words",
    [
        ("eager", "fp16", "cpu", "fp16 is deployed on CUDA only"),
        ("onnxruntime", "bf16", "cpu", "runs the fp32 export"),
        ("bogus", "fp32", "cpu", "backend must be one of"),
        ("eager", "fp64", "cpu", "dtype must be one of"),
    ],
)
def test_a_backend_that_cannot_run_says_why(backend, dtype, device, words):
    with pytest.raises((DeployError, ValueError), match=words):
        deploy(_model(), X, backend=backend, dtype=dtype, device=device)


def test_openvino_is_a_cpu_backend_here():
    assert "CPU" in BACKENDS["openvino"].unavailable(torch.device("cuda"), "fp32")


def test_a_deployed_model_with_other_outputs_is_refused(monkeypatch):
    class Broken(Backend):
        name = "broken"

        def build(self, model, x, info):
            return (lambda inp: model(inp) * 1.5), []

    monkeypatch.setitem(BACKENDS, "broken", Broken())
    with pytest.raises(DeployError, match="outputs differ from the eager fp32 model's"):
        deploy(_model(), X, backend="broken")
    assert deploy(_model(), X, backend="broken", check=False).info.get("max_relative_diff") is None


def test_a_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else find(n, *a))
    with pytest.raises(ImportError, match=r"chase-dst\[openvino\]"):
        deploy(_model(), X, backend="openvino")


def test_a_backend_failure_is_a_deploy_error_not_a_fallback(monkeypatch):
    class Failing(Backend):
        name = "failing"

        def build(self, model, x, info):
            raise RuntimeError("no kernel for this op")

    monkeypatch.setitem(BACKENDS, "failing", Failing())
    with pytest.raises(DeployError, match="failing could not deploy the model: RuntimeError: no kernel"):
        deploy(_model(), X, backend="failing")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_on_cuda_captures_graphs_for_small_batches():
    model = _model().cuda()
    small = deploy(model, X.cuda(), backend="inductor", dtype="bf16")
    assert small.info["cuda_graphs"] is True and small.info["mode"] == "max-autotune"
    assert small.channels_last is True and isinstance(small.info["tf32"], bool)
    large = deploy(model, torch.randn(64, 3, 16, 16, device="cuda"), backend="inductor", dtype="bf16")
    assert large.info["cuda_graphs"] is False and large.info["mode"] == "max-autotune-no-cudagraphs"


def test_export_optimize_writes_the_served_graph(tmp_path, capsys):
    """``chase export --optimize``: the ONNX file holds the graph chase.deploy serves (no BatchNorm),
    checked against the model; a slim checkpoint keeps its architecture, so it is refused there."""
    pytest.importorskip("yaml")
    onnx = pytest.importorskip("onnx")
    from tests.nets import TINY_CHASE_RUN as TINY

    from chase.cli import main

    assert main(["train", "-q", "--out", str(tmp_path), "--set", *TINY]) == 0
    run = tmp_path / "chase"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--optimize", "-o", str(tmp_path / "o.onnx")]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm 21 of 21 folded" in out and "matches PyTorch" in out
    ops = {n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert main(["export", str(run), "--optimize", "-o", str(tmp_path / "s.pt")]) == 2
    assert "--optimize applies to --format onnx or pt2" in capsys.readouterr().err


def test_a_latency_table_profiled_under_inductor_round_trips(tmp_path):
    """``chase profile --backend inductor``: every point is the narrowed model compiled and timed whole
    next to the dense one; the table holds every group, saves, loads, and prunes to a latency budget."""
    import chase
    from chase.profile import profile_latency
    from chase.sparsifier.latency import LatencyTable

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip

    x = torch.randn(8, 3, 32, 32)
    table = profile_latency(build(), x, fractions=(0.5,), warmup=1, repeats=3, backend="inductor")
    assert table.meta["backend"] == "inductor" and table.meta["method"] == "whole forward under inductor"
    assert set(table.groups) == {g.name for g in chase.channel_groups(build(), x[:1]).prunable()}
    table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(tmp_path / "t.json")
    assert loaded.to_dict() == table.to_dict()
    model = build()
    with warnings.catch_warnings():  # a budget that timing noise makes unreachable warns: not the point
        warnings.simplefilter("ignore")
        result = chase.prune_channels(
            model, x[:1], channels=chase.ChannelSpec(), budget=chase.Budget.latency(0.9, tmp_path / "t.json")
        )
    assert result.history is not None
