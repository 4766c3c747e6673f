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


# ------------------------------------------------------------------ transformers models, no build= needed
def _tiny(kind: str):
    """A tiny transformers model (random weights, built from a config) and an input for it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 100, (2, 8))
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=32, num_labels=3,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config).eval(), torch.randint(0, 100, (2, 8))
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval(), torch.randn(2, 3, 16, 16)


def _narrowed(kind: str):
    model, x = _tiny(kind)
    result = chase.prune_channels(
        model, x, channels=chase.ChannelSpec(channel_sparsity=0.5, prune_heads=True)
    )
    assert any(g.endswith(":heads") for g in result.removed), "no head was removed: the test would be weak"
    return model, x, result.history


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_a_narrowed_transformers_model_reloads_without_build(tmp_path, kind):
    model, x, history = _narrowed(kind)
    chase.save_pretrained(model, tmp_path / "m", history=history)
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    dense = info["transformers"]["config"]
    assert dense["architectures"] == [type(model).__name__]
    assert (dense["num_attention_heads"], dense["intermediate_size"]) == (4, 64)  # the dense sizes
    assert info["transformers"]["config_changes"] == {}
    loaded = chase.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_a_folder_in_transformers_format_is_named_with_the_loader_to_use(tmp_path, monkeypatch):
    """ChaseCallback's export_dir holds transformers' own format when the config describes the widths:
    chase.from_pretrained and push_to_hub say so instead of "unsupported format None"."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # refused before any upload is tried
    model, _ = _tiny("llama")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"transformers' own format \(model_type 'llama'\).*AutoModel"):
        chase.from_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="transformers' own format"):
        chase.push_to_hub(tmp_path / "hf", "user/repo")


def _rewrite_config(model, kind):
    """What a training integration may do after shrinking: write the narrowed sizes into model.config."""
    model.config.num_attention_heads = 2
    model.config.intermediate_size = 32
    if kind == "llama":
        model.config.num_key_value_heads = 1


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_config_rewritten_after_narrowing_is_restored_to_the_dense_one(tmp_path, kind):
    model, x, history = _narrowed(kind)
    _rewrite_config(model, kind)
    chase.save_pretrained(model, tmp_path / "m", history=history)
    record = json.loads((tmp_path / "m" / "config.json").read_text())["transformers"]
    assert (record["config"]["num_attention_heads"], record["config"]["intermediate_size"]) == (4, 64)
    assert record["config_changes"]["num_attention_heads"] == 2
    loaded = chase.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    # The rebuilt model's config reads as the saved model's did.
    assert (loaded.config.num_attention_heads, loaded.config.intermediate_size) == (2, 32)


def test_a_config_rewritten_to_every_narrowed_width_is_solved_back(tmp_path):
    """Uniform widths, the residual stream narrowed too: the model's config can describe the narrow model
    exactly (hidden size, heads, key/value heads, MLP width, as an integration writes it), and every one
    of those sizes has to be solved back, where heads times head width could be solved either way."""
    model, x = _tiny("llama")
    spec = chase.ChannelSpec(channel_sparsity=0.5, prune_heads=True, prune_skip=True, channel_rank="uniform")
    history = chase.prune_channels(model, x, channels=spec).history
    layer, head_dim = model.model.layers[0], model.config.head_dim
    narrow = {
        "hidden_size": model.model.embed_tokens.weight.shape[1],
        "intermediate_size": layer.mlp.gate_proj.out_features,
        "num_attention_heads": layer.self_attn.q_proj.out_features // head_dim,
        "num_key_value_heads": layer.self_attn.k_proj.out_features // head_dim,
    }
    assert narrow == {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    for field, value in narrow.items():
        setattr(model.config, field, value)
    chase.save_pretrained(model, tmp_path / "m", history=history)
    dense = json.loads((tmp_path / "m" / "config.json").read_text())["transformers"]["config"]
    assert {k: dense[k] for k in narrow} == {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2
    }  # fmt: skip
    assert dense["head_dim"] == head_dim
    assert torch.equal(_logits(chase.from_pretrained(tmp_path / "m"), x), _logits(model, x))


def test_base_config_rebuilds_what_the_search_cannot_and_a_refusal_writes_nothing(tmp_path, monkeypatch):
    from chase import hfconfig

    model, x = _tiny("bert")
    before = type(model.config).from_dict(model.config.to_dict())  # the config before narrowing
    result = chase.prune_channels(
        model, x, channels=chase.ChannelSpec(channel_sparsity=0.5, prune_heads=True)
    )
    _rewrite_config(model, "bert")
    monkeypatch.setattr(hfconfig, "MAX_SEARCH_BUILDS", 0)  # a rewrite the search gives up on
    with pytest.raises(ValueError, match="pass base_config="):
        chase.save_pretrained(model, tmp_path / "m", history=result.history)
    assert not (tmp_path / "m").exists()
    wrong = before.to_dict() | {"intermediate_size": 128}
    with pytest.raises(ValueError, match="the base_config given does not rebuild"):
        chase.save_pretrained(model, tmp_path / "m", history=result.history, base_config=wrong)
    assert not (tmp_path / "m").exists()
    chase.save_pretrained(model, tmp_path / "m", history=result.history, base_config=before)
    assert torch.equal(_logits(chase.from_pretrained(tmp_path / "m"), x), _logits(model, x))


def test_the_config_a_model_was_loaded_from_restores_a_rewritten_one(tmp_path, monkeypatch):
    """A model loaded with transformers' from_pretrained names its source (config.name_or_path); its
    config there is the dense one, read from disk (a folder or the Hub cache), never from the network."""
    import transformers

    from chase import hfconfig

    tiny, x = _tiny("bert")
    tiny.save_pretrained(tmp_path / "base")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    history = chase.prune_channels(
        model, x, channels=chase.ChannelSpec(channel_sparsity=0.5, prune_heads=True)
    ).history
    _rewrite_config(model, "bert")
    monkeypatch.setattr(hfconfig, "MAX_SEARCH_BUILDS", 0)  # only the loaded-from config can rebuild it
    chase.save_pretrained(model, tmp_path / "m", history=history)
    assert torch.equal(_logits(chase.from_pretrained(tmp_path / "m"), x), _logits(model, x))


def test_a_transformers_model_keeps_its_dtype(tmp_path):
    small, x = _tiny("llama")
    # Built in bfloat16 as transformers does it (the rotary frequencies stay float32).
    model = type(small)._from_config(small.config, dtype=torch.bfloat16).eval()
    history = chase.prune_channels(
        model, x, channels=chase.ChannelSpec(channel_sparsity=0.5, prune_heads=True)
    ).history
    chase.save_pretrained(model, tmp_path / "m", history=history)
    loaded = chase.from_pretrained(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(_logits(loaded, x), _logits(model, x))


@pytest.mark.parametrize(
    "tamper, words",
    [
        (lambda c: c.update(intermediate_size=10**7), "has size"),
        (lambda c: c.update(vocab_size=10**7), "do not give the weights' shapes"),
        (lambda c: c.update(architectures=["AutoConfig"]), "has no model class"),
        (lambda c: c.update(model_type="gpt2"), "model_type"),
    ],
)
def test_a_tampered_transformers_config_is_refused_before_anything_is_allocated(tmp_path, tamper, words):
    """The config is untrusted input: the model it describes is built on the meta device and checked
    against the history and the weights before a real (possibly huge) one is allocated."""
    model, _, history = _narrowed("bert")
    chase.save_pretrained(model, tmp_path / "m", history=history)
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    tamper(info["transformers"]["config"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=words) as raised:
        chase.from_pretrained(tmp_path / "m")
    assert "config.json" in str(raised.value)
