"""Shareable exports: save_pretrained / from_pretrained (safetensors + JSON), and every ``chase export
--format`` read back and compared with the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from tests.nets import TINY_CHASE_RUN, TinyResNet, make_optimizer, train_step

import chase

pytest.importorskip("safetensors")
EXAMPLE = torch.randn(2, 3, 16, 16)


def _trained_chase():
    torch.manual_seed(0)
    model = TinyResNet(width=16)
    opt = make_optimizer("sgd", model)
    sp = chase.Chase(
        model, opt, density=0.3, total_steps=24, example_inputs=EXAMPLE, update_every=4, channel_every=4
    )
    for i in range(24):
        train_step(model, opt, sp, i)
    return model, sp


def test_save_and_load_a_narrowed_model(tmp_path):
    _, sp = _trained_chase()
    assert sp.channel_sparsity_now() > 0
    chase.save_pretrained(sp, tmp_path / "m", speed={"note": "not measured"})
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    assert info["history"] and info["method"] == "Chase" and info["density"] == pytest.approx(0.3, abs=0.01)
    fresh = chase.from_pretrained(tmp_path / "m", build=lambda: TinyResNet(width=16))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fresh(x), sp.export().eval()(x), atol=1e-6)
    assert "chase.from_pretrained" in (tmp_path / "m" / "README.md").read_text()


def test_a_model_saved_by_name_needs_no_builder(tmp_path):
    from chase.models import get_model

    model = get_model("cifar_resnet20", num_classes=10).eval()
    chase.save_pretrained(
        model, tmp_path / "m", model_name="cifar_resnet20", model_kwargs={"num_classes": 10}
    )
    fresh = chase.from_pretrained(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_from_pretrained_says_what_is_wrong(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="not a saved chase model"):
        chase.from_pretrained(tmp_path / "x")
    chase.save_pretrained(TinyResNet(), tmp_path / "y")
    with pytest.raises(ValueError, match="pass build="):
        chase.from_pretrained(tmp_path / "y")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("yaml")
    from chase.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "-q", "--out", str(out), "--set", *TINY_CHASE_RUN]) == 0
    return out / "chase"


@pytest.mark.parametrize("fmt", ["pt", "hf-dir", "onnx", "pt2"])
def test_every_export_format_computes_the_trained_model(run, fmt, tmp_path):
    from chase.cli import main
    from chase.models import get_model
    from chase.slim import load_slim

    reference = load_slim(get_model("cifar_resnet20", 10), run / "slim.pt").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = reference(x)
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = (
        tmp_path / "new" / {"pt": "m.pt", "hf-dir": "hf", "onnx": "m.onnx", "pt2": "m.pt2"}[fmt]
    )  # a new folder
    assert main(["export", str(run), "--format", fmt, "-o", str(out)]) == 0
    if fmt == "pt":
        got = load_slim(get_model("cifar_resnet20", 10), out).eval()(x)
    elif fmt == "hf-dir":
        got = chase.from_pretrained(out)(x)
    elif fmt == "pt2":
        program = torch.export.load(str(out)).module()
        got = program(x)
        with torch.no_grad():  # the batch dimension is dynamic
            assert torch.allclose(program(x[:1]), reference(x[:1]), atol=1e-4)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert torch.allclose(got.detach(), expected, atol=1e-4)


def test_export_refuses_a_pt2_name_and_a_foreign_folder(run, tmp_path, capsys):
    from chase.cli import main

    assert main(["export", str(run), "--format", "pt2", "-o", str(tmp_path / "m.pt")]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--format", "hf-dir", "-o", str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err
    assert ".pt2 file" in err and "holds other files" in err
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "tamper, words",
    [
        (
            lambda i: i["history"]["tensors"][next(iter(i["history"]["tensors"]))]["0"].update(kept=[10**6]),
            "outside",
        ),
        (
            lambda i: i["history"]["tensors"][next(iter(i["history"]["tensors"]))]["0"].update(size=10**13),
            "has size",
        ),
        (
            lambda i: i["history"]["channels"][next(iter(i["history"]["channels"]))].update(size=10**13),
            "larger than",
        ),
        (
            lambda i: i["history"]["tensors"][next(iter(i["history"]["tensors"]))]["0"].update(kept="all"),
            "list of",
        ),
        (lambda i: i.update(model_kwargs=[10]), "model_kwargs must be an object"),
        (lambda i: i.update(model="cifar_resnet_20"), "cannot build model"),
    ],
)
def test_a_tampered_config_is_refused_before_anything_is_allocated(tmp_path, tamper, words):
    """A shared model's config.json is untrusted input: every size and index is checked against the built
    model first (a forged size of 10^13 used to reach the allocator; a kept index past the width was a
    bare IndexError)."""
    from chase.models import get_model

    model = get_model("cifar_resnet20", num_classes=10)
    result = chase.prune_channels(
        model, torch.randn(1, 3, 32, 32), channels=chase.ChannelSpec(channel_sparsity=0.5)
    )
    chase.save_pretrained(
        model,
        tmp_path / "m",
        history=result.history,
        model_name="cifar_resnet20",
        model_kwargs={"num_classes": 10},
    )
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    tamper(info)
    (tmp_path / "m" / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=words) as raised:
        chase.from_pretrained(tmp_path / "m")
    assert "config.json" in str(raised.value)


def test_from_pretrained_names_a_pickle_under_the_weights_name_and_a_module_given_as_build(tmp_path):
    model = TinyResNet(width=16)
    chase.save_pretrained(model, tmp_path / "m")
    torch.save({"w": torch.zeros(1)}, tmp_path / "m" / "model.safetensors")  # a pickle, named as weights
    with pytest.raises(ValueError, match=r"model\.safetensors is not a safetensors file"):
        chase.from_pretrained(tmp_path / "m", build=lambda: TinyResNet(width=16))
    with pytest.raises(TypeError, match="build must be a function"):
        chase.from_pretrained(tmp_path / "m", build=TinyResNet(width=16))
