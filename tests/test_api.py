"""The top layer's one-owner pieces: the slim format, one-shot channel pruning, the algorithm registry,
and checkpoints written before them."""

from __future__ import annotations

import copy
import pathlib
import shutil

import pytest
import torch
from tests.nets import TinyResNet, make_optimizer, train_step

import chase
from chase.slim import SLIM_FORMAT_VERSION, load_slim, make_slim, read_slim, save_slim
from chase.sparsifier import registry

EXAMPLE = torch.randn(2, 3, 16, 16)
DATA = pathlib.Path(__file__).parent / "data"


# ---------------------------------------------------------------- the slim format, for every method
@pytest.mark.parametrize("method", ["static", "set", "rigl", "mest", "chase"])
def test_every_sparsifier_exports_a_slim_checkpoint_that_reloads(method, tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    extra = (
        {"example_inputs": EXAMPLE, "channel_every": 2, "channel_sparsity": 0.5} if method == "chase" else {}
    )
    sp = registry.create(method, model, opt, density=0.3, total_steps=12, update_every=4, **extra)
    for i in range(12):
        train_step(model, opt, sp, i)
    assert sp.removes_channels == (method == "chase")
    save_slim(sp.slim_checkpoint({"note": method}), tmp_path / "m.pt")
    ckpt = read_slim(tmp_path / "m.pt")
    assert ckpt["format_version"] == SLIM_FORMAT_VERSION and ckpt["meta"] == {"note": method}
    assert bool(ckpt["history"]) == (method == "chase")
    fresh = load_slim(TinyResNet(), tmp_path / "m.pt").eval()  # a path works as well as the dict
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fresh(x), sp.export().eval()(x), atol=1e-5)
    for name, mask in ckpt["masks"].items():  # masks have the exported shapes and match the zeros
        w = fresh.get_parameter(name)
        assert mask.shape == w.shape and not w[~mask].any()


def test_an_unstructured_export_is_the_model_itself():
    model = TinyResNet()
    sp = chase.RigL(model, make_optimizer("sgd", model), density=0.5, total_steps=10)
    assert sp.export() is model


def test_slim_reader_says_what_a_file_is(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a torch file at all")
    torch.save({"config": {}, "optimizer": {}, "format_version": 1}, tmp_path / "train.pt")
    torch.save({"format_version": 99, "model": {}}, tmp_path / "future.pt")
    for name, words in [
        ("empty.pt", "is not a slim checkpoint"),
        ("junk.pt", "is not a slim checkpoint"),
        ("train.pt", "training checkpoint"),
        ("future.pt", "unsupported slim checkpoint format 99"),
        ("missing.pt", "does not exist"),
    ]:
        with pytest.raises(ValueError, match=words) as e:
            read_slim(tmp_path / name)
        assert "weights_only=False" not in str(e.value)  # never pass on torch's unsafe advice
    with pytest.raises(ValueError, match="not a slim checkpoint"):
        save_slim({"format_version": SLIM_FORMAT_VERSION}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_a_file_without_history_loads():
    """Files of unstructured runs written before the format had one owner had no 'history' key."""
    model = TinyResNet()
    ckpt = make_slim(model)
    del ckpt["history"]
    fresh = load_slim(TinyResNet(width=8), ckpt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


# ---------------------------------------------------------------- prune_channels
def test_prune_channels_is_a_chase_event():
    """One-shot pruning removes exactly what Chase's last event removes from the same weights and masks."""
    torch.manual_seed(0)
    model = TinyResNet()
    sp = chase.Chase(
        model,
        make_optimizer("sgd", model),
        density=0.3,
        total_steps=40,
        example_inputs=EXAMPLE,
        channel_sparsity=0.5,
        update_every=8,
        channel_every=4,
    )
    twin, masks = copy.deepcopy(model), {n: m.clone() for n, m in sp.masks.items()}
    sp.remove_channels_now(sp.last_event)
    result = chase.prune_channels(twin, EXAMPLE, channel_sparsity=0.5, masks=masks)
    assert [p.shape for p in twin.parameters()] == [p.shape for p in sp.export().parameters()]
    assert result.channel_sparsity == pytest.approx(sp.channel_sparsity_now())
    assert result.total_channels == sp.total_channels and result.removed
    assert all(result.masks[n].shape == twin.get_parameter(n).shape for n in result.masks)
    # The history rebuilds the narrow shape in a fresh model.
    fresh = load_slim(TinyResNet(), make_slim(twin, history=result.history))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), twin.eval()(x))


def test_prune_channels_refuses_bad_input_and_leaves_the_model():
    model = TinyResNet()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="channel_sparsity"):
        chase.prune_channels(model, EXAMPLE, channel_sparsity=1.5)
    with pytest.raises(ValueError, match="not sparse layers"):
        chase.prune_channels(model, EXAMPLE, channel_sparsity=0.5, masks={"nope.weight": torch.ones(1)})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_untrained_slim_matches_the_chase_it_replaced():
    """untrained_slim = Chase (ERK masks at d, seed 0) with its whole S_c removed at once."""
    torch.manual_seed(0)
    model = TinyResNet()
    slim = chase.untrained_slim(model, EXAMPLE, 0.5, density=0.1)
    work = copy.deepcopy(model)
    sp = chase.Chase(
        work,
        torch.optim.SGD(work.parameters(), lr=0.0),
        density=0.1,
        soft_bound=0.0,
        total_steps=6,
        example_inputs=EXAMPLE,
        channel_sparsity=0.5,
        update_every=2,
        channel_every=1,
        channel_end=2,
    )
    sp.remove_channels_now(sp.last_event)
    ref = sp.export()
    assert all(torch.equal(a, b) for a, b in zip(slim.state_dict().values(), ref.state_dict().values()))


# ---------------------------------------------------------------- the registry and the config
def test_registry_defaults_are_the_classes_defaults():
    assert registry.METHODS == ("dense", "static", "set", "rigl", "mest", "chase")
    assert registry.defaults("chase")["update_every"] == 1000
    assert registry.defaults("chase")["channel_sparsity"] == 0.4
    assert registry.defaults("rigl")["update_every"] == 100
    assert registry.defaults("set")["growth"] == "random"
    assert registry.defaults("mest")["soft_bound"] == 0.05
    with pytest.raises(ValueError, match="unknown method"):
        registry.defaults("nope")


def test_config_none_means_the_library_default():
    from chase.train.config import TrainConfig, load_config

    cfg = load_config([], ["method=chase"])
    assert cfg.update_every is None and cfg.resolved("update_every") == 1000
    assert cfg.resolved("channel_sparsity") == 0.4
    assert TrainConfig(method="rigl").resolved("update_every") == 100
    assert load_config([], ["update_every=7"]).resolved("update_every") == 7


@pytest.mark.parametrize(
    "override, words",
    [
        ("channel_sparsity=1.5", "channel_sparsity must be in"),
        ("min_channel_ratio=2", "min_channel_ratio must be in"),
        ("swap_fraction=-0.1", "swap_fraction must be in"),
        ("channel_every=0", "channel_every must be >= 1"),
        ("update_every=0", "update_every must be >= 1"),
        ("density=1.5", "density must be in"),
        ("removal=nope", "removal='nope' is not one of"),
    ],
)
def test_cli_refuses_bad_library_options_in_one_line(override, words, tmp_path, capsys):
    from chase.cli import main

    assert main(["train", "-q", "--out", str(tmp_path), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chase train: error:") and words in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------- runs written before this layout
def test_a_run_checkpointed_by_version_0_1_resumes_bit_for_bit(tmp_path):
    """tests/data/run_v0_1: a run written by the code before the top-layer refactor (commit 160e8f9),
    stopped after its first epoch; expected_slim.pt is the same run's result without the stop."""
    pytest.importorskip("yaml")
    from chase.cli import main

    run = tmp_path / "old"
    shutil.copytree(DATA / "run_v0_1", run)
    expected = torch.load(run / "expected_slim.pt", weights_only=True)
    assert main(["train", "-q", "--resume", str(run)]) == 0
    got = read_slim(run / "slim.pt")
    assert got.keys() >= {"history", "model", "meta"}
    assert got["model"].keys() == expected["model"].keys()
    for k, v in expected["model"].items():
        assert torch.allclose(got["model"][k].double(), v.double(), rtol=1e-4, atol=1e-5), k


# ---------------------------------------------------------------- what a new user tried (review)
def test_prune_channels_scores_masked_weights_as_zero():
    from chase.models import get_model

    model = get_model("resnet18", num_classes=10)
    masks = {"layer1.0.conv1.weight": torch.zeros_like(model.layer1[0].conv1.weight, dtype=torch.bool)}
    chase.prune_channels(model, torch.randn(1, 3, 32, 32), channel_sparsity=0.5, masks=masks)
    # Every weight of layer1.0.conv1 is masked: its channels score 0 and go first, down to the floor.
    assert model.layer1[0].conv1.out_channels == max(1, int(64 * 0.5 * 0.2))
    with pytest.raises(ValueError, match="their weight's shape"):
        chase.prune_channels(
            get_model("resnet18", num_classes=10),
            torch.randn(1, 3, 32, 32),
            channel_sparsity=0.5,
            masks={"layer1.0.conv1.weight": torch.ones(3, dtype=torch.bool)},
        )


def test_options_that_would_be_ignored_are_refused():
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    for options, words in [
        ({"target": "params", "macs_ratio": 0.5}, "does not use it"),
        ({"macs_ratio": 0.5, "params_ratio": 0.5}, "one budget at a time"),
        ({"target": "macs", "macs_ratio": 0.5, "params_ratio": 0.5}, "params_ratio given"),
        ({"channel_multiple": True}, "channel_multiple must be an integer"),
    ]:
        with pytest.raises(ValueError, match=words):
            chase.Chase(model, opt, density=0.3, total_steps=40, example_inputs=EXAMPLE, **options)


def test_registry_check_is_the_constructors_validation(tmp_path):
    assert registry.defaults("dense") == {}
    for method, options, words in [
        ("rigl", {"density": 0.1, "bogus": 1}, "has no option"),
        ("rigl", {"density": 0.1, "channel_multiple": 8}, "options of Chase only"),
        ("chase", {"density": 0.1, "initial_density": 0.05}, "initial_density must be in"),
        ("rigl", {}, "density is required"),
        ("dense", {"update_every": 5}, "no sparsifier"),
        (
            "chase",
            {
                "density": 0.1,
                "target": "latency",
                "latency_ratio": 0.5,
                "latency_table": str(tmp_path / "no.json"),
            },
            "not a latency table",
        ),
    ]:
        with pytest.raises(ValueError, match=words):
            registry.check(method, **options)


def test_a_resumed_latency_run_keeps_its_table(tmp_path):
    table = {
        "format_version": 1,
        "dense_ms": 1.0,
        "groups": {"block_a": {"widths": [4, 8], "ms": [0.5, 1.0]}},
    }
    path = tmp_path / "t.json"
    path.write_text(__import__("json").dumps(table))
    kw = {"density": 0.3, "total_steps": 40, "example_inputs": EXAMPLE, "update_every": 8, "channel_every": 4}
    kw |= {"target": "latency", "latency_ratio": 0.8, "latency_table": str(path)}
    model = TinyResNet()
    sp = chase.Chase(model, make_optimizer("sgd", model), **kw)
    state = sp.state_dict()
    table["groups"]["block_a"]["ms"] = [0.9, 1.0]  # the file changes after the run started
    path.write_text(__import__("json").dumps(table))
    other = TinyResNet()
    resumed = chase.Chase(other, make_optimizer("sgd", other), **kw)
    with pytest.warns(UserWarning, match="latency table changed"):
        resumed.load_state_dict(state)
    assert resumed.pruner.cost.groups["block_a"][1] == [0.5, 1.0]


def test_save_pretrained_checks_before_it_writes(tmp_path):
    from chase.models import get_model

    model = get_model("cifar_resnet20", num_classes=10)
    with pytest.raises(ValueError, match="plain JSON"):
        chase.save_pretrained(
            model, tmp_path / "a", model_kwargs={"num_classes": 10, "norm": torch.nn.BatchNorm2d}
        )
    with pytest.raises(ValueError, match="does not rebuild this model"):
        chase.save_pretrained(model, tmp_path / "b", model_name="resnet18", model_kwargs={"num_classes": 10})
    with pytest.raises(TypeError, match=r"sparsifier or an nn\.Module"):
        chase.save_pretrained("hello", tmp_path / "c")
    assert not any(tmp_path.iterdir())
    # A module narrowed by prune_channels shares with its history.
    result = chase.prune_channels(model, torch.randn(1, 3, 32, 32), channel_sparsity=0.5)
    chase.save_pretrained(model, tmp_path / "d", history=result.history, model_name="cifar_resnet20",
                          model_kwargs={"num_classes": 10})  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(chase.from_pretrained(tmp_path / "d")(x), model.eval()(x))
    assert (tmp_path / "d" / "model.safetensors").stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize(
    "argv, words",
    [
        (["flops", "-m", "resnet18", "--channel-multiple", "4"], "--channel-multiple applies to"),
        (["check", "-m", "resnet18", "--channel-sparsity", "2"], "channel_sparsity must be in"),
        (["flops", "-m", "resnet18", "--macs-ratio", "1.5"], "needs macs_ratio in (0, 1)"),
        (
            ["flops", "-m", "resnet18", "--channel-sparsity", "0.3", "--channel-rank", "score_per_cost"],
            "needs a budget target",
        ),
    ],
)
def test_more_cli_usage_errors(argv, words, capsys):
    from chase.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_flops_ranks_channels_normalized_at_a_channel_sparsity(capsys):
    from chase.cli import main

    argv = ["flops", "-m", "resnet18", "--num-classes", "10", "--input", "32", "--channel-sparsity", "0.3"]
    assert main([*argv, "--channel-rank", "normalized"]) == 0
    assert "channel_rank=normalized" in capsys.readouterr().out


def test_flops_measures_a_macs_budget(capsys):
    from chase.cli import main

    argv = ["flops", "-m", "resnet18", "--num-classes", "10", "--input", "32", "--macs-ratio", "0.6"]
    assert main([*argv, "--channel-multiple", "8"]) == 0
    out = capsys.readouterr().out
    ratio = float(
        next(line for line in out.splitlines() if line.startswith("GPU-supported (slim)")).split()[-1][:-1]
    )
    assert 0.5 < ratio <= 0.6


def test_a_library_warning_is_one_line_of_the_commands_output(capsys, caplog):
    """A budget out of reach warns through Python's warnings: the command says it in one line (no file,
    line number or source line of the library), and the run still ends with the widths it reached."""
    from chase.cli import main

    argv = ["flops", "-m", "cifar_resnet20", "--num-classes", "10", "--input", "32", "--prune-skip"]
    with caplog.at_level("WARNING"):
        assert main([*argv, "--latency-ratio", "0.05", "--roofline", "h200", "--density", "1.0"]) == 0
    lines = [r.getMessage() for r in caplog.records if "budget not reached" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("warning: latency budget not reached")
    assert "roofline (NVIDIA H200, cuda, batch 32, fused)" in capsys.readouterr().out
    assert "one_shot.py" not in caplog.text and "UserWarning" not in caplog.text


# ---------------------------------------------------------------- one convention across the CLI
def test_every_flag_of_every_command_has_help():
    from chase.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [
        f"chase {name} {a.option_strings[0]}"
        for name, p in sub.choices.items()
        for a in p._actions
        if a.option_strings and a.option_strings[0] not in ("-h", "--help") and not a.help
    ]
    assert not missing, missing


def test_model_commands_build_a_named_model_at_the_same_default_size():
    """check, flops, bench and profile: one --input and --num-classes default (flops/bench prefer the
    size of the run they read)."""
    from chase.cli import build_parser
    from chase.cli.args import MODEL_CLASSES, MODEL_INPUT

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("check", "flops", "bench", "profile"):
        args = sub.choices[name].parse_args(["-m", "resnet18", "-o", "x.json"])
        assert args.num_classes == MODEL_CLASSES, name
        assert args.input == (None if name in ("flops", "bench") else MODEL_INPUT), name
        helps = {a.dest: a.help for a in sub.choices[name]._actions}
        assert f"{MODEL_INPUT})" in helps["input"] and f"({MODEL_CLASSES})" in helps["num_classes"], name


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    from chase.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"chase-dst {chase.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "chase", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"chase-dst {chase.__version__}"


def test_save_slim_sits_next_to_load_slim_and_the_export_hint_runs(tmp_path):
    model = TinyResNet()
    chase.save_slim(make_slim(model), tmp_path / "m.pt")
    assert chase.load_slim(TinyResNet(), tmp_path / "m.pt") is not None


@pytest.mark.parametrize("command", ["bench", "profile"])
def test_a_device_that_is_not_one_is_a_usage_error(command, tmp_path, capsys):
    from chase.cli import main

    argv = [command, "--model", "cifar_resnet20", "--num-classes", "10", "--device", "tpu"]
    argv += ["-o", str(tmp_path / "t.json")] if command == "profile" else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"chase {command}: error:") and "tpu" in err and "\n" not in err
