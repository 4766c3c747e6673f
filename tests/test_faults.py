"""Nothing lost, nothing silent: torn files, crashes inside every atomic write, a full disk, stale temporary
files, resumes in another world, and a table of bad inputs that must each end in one clear line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import pathlib
import shutil

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("yaml")

from tests.nets import TinyResNet, make_optimizer  # noqa: E402

import chase  # noqa: E402
from chase import io as chase_io  # noqa: E402
from chase.cli import main  # noqa: E402
from chase.train import run as run_mod  # noqa: E402

TINY = [
    "dataset=synthetic",
    "image_size=8",
    "synthetic_train=64",
    "synthetic_test=32",
    "batch_size=16",
    "num_workers=0",
    "epochs=2",
    "model=cifar_resnet20",
    "method=chase",
    "update_every=2",
    "channel_every=2",
    "channel_sparsity=0.5",
    "density=0.2",
    "speedup_batch=0",
    "tensorboard=false",
    "threads=1",
    "ckpt_every_steps=3",
]


def _train(out: pathlib.Path, name: str, *sets: str) -> int:
    return main(["train", "-q", "--out", str(out), "--set", *TINY, f"name={name}", *sets])


def _stop_after(monkeypatch, step: int) -> None:
    """Make the next run die right after writing the checkpoint of ``step``."""
    save = run_mod.save_checkpoint

    def save_then_die(st, path):
        save(st, path)
        if st.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "save_checkpoint", save_then_die)


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("finished")
    assert _train(out, "run") == 0
    return out / "run"


@pytest.fixture
def interrupted(tmp_path, monkeypatch) -> pathlib.Path:
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path, "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- torn and crashed writes
def test_a_torn_metrics_line_does_not_stop_the_resume(interrupted):
    with open(interrupted / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train_step", "step": 3, "lo')  # the disk filled up mid-append
    assert main(["train", "-q", "--resume", str(interrupted)]) == 0
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)  # the torn line is gone, every other line parses
    assert any(json.loads(x)["kind"] == "final" for x in lines)


def test_the_metrics_rewrite_at_resume_is_atomic(interrupted, monkeypatch):
    before = (interrupted / "metrics.jsonl").read_text()

    def crash(*args, **kwargs):
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(chase_io.os, "replace", crash)
    with pytest.raises(OSError):
        run_mod.Metrics(interrupted, True, resume_step=1)
    assert (interrupted / "metrics.jsonl").read_text() == before
    assert not chase_io.stale_temporaries(interrupted)


@pytest.mark.parametrize("writer", ["atomic_save", "atomic_write_text"])
def test_a_crash_inside_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, writer):
    path = tmp_path / "f"
    write = getattr(chase_io, writer)
    first = {"v": torch.ones(2)} if writer == "atomic_save" else "first\n"
    write(path, first) if writer == "atomic_write_text" else write(first, path)
    old = path.read_bytes()
    monkeypatch.setattr(chase_io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "crash")))
    with pytest.raises(OSError):
        write(path, "second\n") if writer == "atomic_write_text" else write({"v": torch.zeros(2)}, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("where", ["checkpoint", "slim"])
def test_a_crash_while_saving_leaves_a_resumable_run(tmp_path, monkeypatch, where):
    """Die inside the write of the second checkpoint, or of the exported model: the run resumes."""
    calls = {"n": 0}
    save = chase_io.torch.save

    def dying_save(obj, f):
        is_slim = "history" in obj and "optimizer" not in obj
        if (where == "slim" and is_slim) or (where == "checkpoint" and not is_slim):
            calls["n"] += 1
            if where == "slim" or calls["n"] == 2:
                f.write(b"half a file")
                raise KeyboardInterrupt
        save(obj, f)

    with monkeypatch.context() as m:
        m.setattr(chase_io.torch, "save", dying_save)
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path, "run")
    run = tmp_path / "run"
    assert not chase_io.stale_temporaries(run)
    assert main(["train", "-q", "--resume", str(run)]) == 0
    assert (run / "slim.pt").exists()


def test_a_full_disk_is_said_so(tmp_path, monkeypatch, capsys):
    def full(obj, f):
        f.write(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 59")

    monkeypatch.setattr(chase_io.torch, "save", full)
    with pytest.raises(OSError, match="no space left") as e:
        chase_io.atomic_save({"a": 1}, tmp_path / "x.pt")
    assert e.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())
    assert _train(tmp_path, "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chase train: error:") and "no space left" in err and "\n" not in err


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(interrupted):
    stale = interrupted / ".checkpoint.pt.tmp12345"
    stale.write_bytes(b"partial")
    assert main(["train", "-q", "--resume", str(interrupted)]) == 0
    assert not stale.exists()


# ---------------------------------------------------------------- resume in another world
@pytest.mark.parametrize(
    "key, value, words", [("world", 2, "processes 2 -> 1"), ("train_size", 48, "48 -> 64")]
)
def test_resume_refuses_another_world(interrupted, key, value, words, capsys):
    ckpt = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert ckpt["meta"]["world"] == 1 and ckpt["meta"]["train_size"] == 64
    ckpt["meta"][key] = value
    torch.save(ckpt, interrupted / "checkpoint.pt")
    before = _snapshot(interrupted)
    assert main(["train", "-q", "--resume", str(interrupted)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and words in err
    assert _snapshot(interrupted) == before


def test_other_ranks_resume_with_empty_epoch_sums():
    """Rank 0's checkpoint holds every rank's partial sums added up: only rank 0 may carry them on."""
    from chase.train.checkpoint import restore

    class Rank:
        def __init__(self, rank):
            self.rank, self.main = rank, rank == 0

    class State:
        def __init__(self, rank):
            self.dist, self.device, self.sparsifier = Rank(rank), torch.device("cpu"), None
            self.module = self.optimizer = self.scheduler = _Loadable()
            self.scaler, self.cfg = None, type("C", (), {"seed": 0})()

        def wrap(self):
            pass

    ckpt = {
        "sparsifier": None,
        "model": {},
        "optimizer": {},
        "scheduler": {},
        "scaler": None,
        "epoch": 0,
        "batch": 3,
        "step": 3,
        "sums": torch.tensor([6.0, 3.0, 96.0], dtype=torch.float64),
        "rng": chase_rng(),
    }
    for rank, expected in ((0, [6.0, 3.0, 96.0]), (1, [0.0, 0.0, 0.0])):
        st = State(rank)
        restore(st, ckpt)
        assert st.sums.tolist() == expected


class _Loadable:
    def load_state_dict(self, state):
        pass


def chase_rng():
    from chase.train.checkpoint import rng_state

    return rng_state()


# ---------------------------------------------------------------- the library refuses what cannot work
def test_two_sparsifiers_on_one_model_are_refused():
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    first = chase.RigL(model, opt, density=0.2, total_steps=10)
    with pytest.raises(ValueError, match="already masked by a RigL"):
        chase.SET(model, opt, density=0.2, total_steps=10)
    first.remove()
    chase.SET(model, opt, density=0.2, total_steps=10)  # after remove() another one may take it


def test_tied_weights_get_one_mask():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16, bias=False)
            self.b = torch.nn.Linear(16, 16, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    sp = chase.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.25, total_steps=10)
    assert list(sp.masks) == ["a.weight"]
    assert sp.global_density() == pytest.approx(0.25)
    assert float((model.a.weight != 0).float().mean()) == pytest.approx(0.25)


def test_a_negative_end_step_is_refused():
    model = TinyResNet()
    with pytest.raises(ValueError, match="end_step"):
        chase.RigL(model, make_optimizer("sgd", model), density=0.2, total_steps=10, end_step=-5)


# ---------------------------------------------------------------- bad inputs through the CLI
BAD_TRAIN = [
    ("channel_sparsity=1.5", "channel_sparsity must be in [0, 1)"),
    ("min_channel_ratio=-1", "min_channel_ratio must be in"),
    ("lr=-0.1", "lr must be > 0"),
    ("lr=nan", "lr must be > 0"),
    ("model=resnet_nope", "unknown model name"),
    ("device=gpu", "device='gpu'"),
    ("ckpt_every_steps=-1", "ckpt_every_steps must be >= 0"),
    ("log_every=-1", "log_every must be >= 0"),
    ("threads=-2", "threads must be >= 0"),
    ("warmup_epochs=-1", "warmup_epochs must be >= 0"),
    ("name=../../x", "plain folder name"),
    ("name=/tmp/x", "plain folder name"),
]
if not torch.cuda.is_available():
    BAD_TRAIN.append(("device=cuda", "CUDA is not available"))


@pytest.mark.parametrize("override, words", BAD_TRAIN)
def test_bad_train_options_are_one_line(tmp_path, capsys, override, words):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    before = _snapshot(tmp_path)
    assert _train(out, "x", override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chase train: error:") and words in err and "\n" not in err, err
    assert _snapshot(tmp_path) == before


def _bad_commands(run: pathlib.Path) -> list[tuple[list[str], str]]:
    return [
        (["export", str(run / "slim.pt")], "not a training checkpoint"),
        (["flops", str(run / "slim.pt")], "not a training checkpoint"),
        (["bench", str(run / "slim.pt"), "--batch-sizes", "1"], "not a training checkpoint"),
        (["export", str(run / "empty.pt")], "is not a training checkpoint"),
        (["export", str(run / "junk.pt")], "is not a training checkpoint"),
        (["export", str(run), "-o", str(run / "checkpoint.pt")], "refusing to write"),
        (["export", str(run), "-o", str(run / "config.yaml")], "refusing to write"),
        (["flops", str(run), "--json", str(run / "checkpoint.pt")], "refusing to write"),
        (["bench", str(run), "--json", str(run / "metrics.jsonl")], "refusing to write"),
        (["analyze", str(run), "--out", str(run / "checkpoint.pt")], "is a file"),
        (["flops", "--model", "resnet18", "--input", "0"], "--input: must be >= 1"),
        (["bench", "--model", "resnet18", "--batch-sizes", "0"], "--batch-sizes: must be >= 1"),
        (["bench", "--model", "resnet18", "--batch-sizes", "4,x"], "--batch-sizes: expected an integer"),
        (["flops", "--model", "resnet_nope"], "unknown model name"),
        (["flops", "--model", "resnet18", "--channel-sparsity", "1.5"], "channel_sparsity must be in"),
        (["check", "--model", "resnet_nope"], "unknown model name"),
        (["train", "--resume", str(run / "nowhere")], "cannot resume"),
        (
            ["profile", "-m", "cifar_resnet20", "--num-classes", "10", "-o", str(run / "checkpoint.pt")],
            "refusing",
        ),
        (["analyze", str(run), "--amenable-ratio", "-1"], "--amenable-ratio must be in"),
        # the typed channel options, budgets, cost models, backends and schedules (issues 25, 26, 28)
        (
            ["flops", "--model", "resnet18", "--macs-ratio", "0.5", "--params-ratio", "0.5"],
            "one budget at a time",
        ),
        (["flops", "--model", "resnet18", "--target", "params", "--macs-ratio", "0.5"], "does not use it"),
        (["flops", "--model", "resnet18", "--latency-ratio", "0.5"], "needs latency_table"),
        (
            ["flops", "--model", "resnet18", "--latency-ratio", "0.5", "--roofline", "h300"],
            "unknown roofline",
        ),
        (
            ["flops", "--model", "resnet18", "--latency-ratio", "0.5", "--roofline", "h200:lazy"],
            "fused or eager",
        ),
        (
            ["flops", "--model", "resnet18", "--latency-ratio", "0.5", "--roofline", "h200@x"],
            "must be an integer",
        ),
        (
            [
                "flops",
                "--model",
                "resnet18",
                "--macs-ratio",
                "0.5",
                "--latency-table",
                str(run / "config.yaml"),
            ],
            "latency_table given, but neither",
        ),
        (
            [
                "flops",
                "--model",
                "resnet18",
                "--latency-ratio",
                "0.5",
                "--latency-table",
                str(run / "junk.pt"),
            ],
            "not a latency table",
        ),
        (
            ["flops", "--model", "resnet18", "--channel-rank", "latency_weighted", "--macs-ratio", "0.5"],
            "needs",
        ),
        (["flops", "--model", "resnet18", "--channel-multiple", "0", "--channel-sparsity", "0.3"], ">= 1"),
        (
            ["flops", "--model", "resnet18", "--min-channel-ratio", "2", "--channel-sparsity", "0.3"],
            "min_channel",
        ),
        (["flops", "--model", "resnet18", "--channel-score", "l2"], "invalid choice"),
        (["flops", "--model", "resnet18", "--channel-multiple", "8"], "applies to untrained widths"),
        (["flops", str(run), "--channel-sparsity", "0.3"], "not both"),
        (["bench", "--model", "resnet18", "--backend", "tensorrt"], "unknown backend"),
        (["bench", "--model", "resnet18", "--device", "tpu"], "not a device"),
        (["bench", "--model", "resnet18", "--dtypes", "fp8"], "unknown dtype"),
        (["bench", str(run), "--out", str(run / "config.yaml")], "refusing to write"),
        (["check", "--model", "resnet18", "--channel-sparsity", "1"], "channel_sparsity must be in"),
        (["check", "--model", "resnet18", "--removal", "delete"], "invalid choice"),
        (["check", "--model", "resnet18", "--out", str(run / "metrics.jsonl")], "refusing to write"),
        (["profile", "--roofline", "--dtype", "fp8", "-o", str(run / "r.json")], "invalid choice"),
        (["profile", "-o", str(run / "t.json")], "give --model"),
        (["profile", "-m", "cifar_resnet20", "--backend", "tensorrt", "-o", str(run / "t.json")], "backend"),
        (["profile", "-m", "cifar_resnet20", "--device", "tpu", "-o", str(run / "t.json")], "not a device"),
        (["export", str(run), "--optimize", "-o", str(run / "x.pt")], "--optimize applies to"),
        (["export", str(run), "-o", str(run / "report.md")], "exists: give --overwrite"),
        (["train", "--set", "channel_end=2"], "fraction of the run"),
        (["train", "--set", "channel_end=0.5", "channel_end_epoch=1"], "not both"),
        (["train", "--set", "roofline=h300", "latency_ratio=0.5"], "unknown roofline"),
        (["train", "--set", "macs_ratio=1.5"], "needs macs_ratio in"),
        (["train", "--set", "channel_rank=cost"], "is not one of"),
        (["train", "--set", "dataset=synthetic", "channel_every=1000"], "no channel event fits"),
        (["train", "--set", "max_bad_steps=-1"], "max_bad_steps must be >= 0"),
        (["train", "--channel-sparsity", "2"], "channel_sparsity must be in"),
        (["train", "--set", "channel_every=100", "channel_every_epochs=1"], "not both"),
        (["export", str(run / "notes.txt")], "not a file torch.save wrote"),
        (["flops", "--model", "resnet18", "-o", "a.json", "--json", "b.json"], "name the same output"),
        (["bench", "--model", "resnet18", "--backend", ","], "names no backend"),
        (["profile", "--roofline", "-m", "resnet18", "-o", str(run / "r.json")], "drop --model"),
        (
            ["flops", "--model", "resnet18", "--latency-ratio", "0.5", "--latency-table", "h200"],
            "is a roofline's device",
        ),
        (
            [
                "train",
                "--set",
                "method=rigl",
                "dataset=synthetic",
                "initial_density=0.5",
                "prune_end_epoch=100",
                "update_every=2",
            ],
            "prune_end",
        ),
    ]


def test_bad_commands_are_one_line_and_change_nothing(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that were not refused would write here, not in the checkout
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "empty.pt").write_bytes(b"")
    (run / "junk.pt").write_bytes(b"\x80\x04not really a pickle")
    (run / "notes.txt").write_text("hi\n")
    before = _snapshot(run)
    for argv, words in _bad_commands(run):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"chase {argv[0]}: error:") and words in err, (argv, err)
        assert "\n" not in err and "weights_only=False" not in err, (argv, err)
        assert _snapshot(run) == before, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside it


def _output_flags() -> dict[str, list[str]]:
    """Every command's flags that name a file it writes (from the parser: a flag whose dest is ``out``)."""
    from chase.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {
        name: sorted(
            {o for a in p._actions if a.dest == "out" for o in a.option_strings if o.startswith("--")}
        )
        for name, p in sub.choices.items()
    }


def _writing_command(command: str, flag: str, run: pathlib.Path, target: pathlib.Path) -> list[str]:
    model = ["--model", "cifar_resnet20", "--num-classes", "10", "--input", "8"]
    return {
        "export": ["export", str(run), flag, str(target)],
        "flops": ["flops", str(run), flag, str(target)],
        "bench": ["bench", str(run), "--batch-sizes", "1", "--repeats", "1", flag, str(target)],
        "analyze": ["analyze", str(run), flag, str(target.with_suffix(".png"))],
        "check": ["check", *model, flag, str(target)],
        "profile": [
            "profile",
            *model,
            "--batch",
            "2",
            "--fractions",
            "0.5",
            "--repeats",
            "1",
            flag,
            str(target),
        ],
    }[command]


def test_no_command_replaces_a_run_file_or_an_existing_file_without_overwrite(finished, tmp_path, capsys):
    """Walk every command's output flags: pointed at a run's checkpoint, config, metrics, slim model or
    report, or at any existing file of the user's, each command refuses in one line and changes nothing;
    with --overwrite it replaces the user's file but never the run's resume files."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "mine.json").write_text("my notes")
    (run / "mine.png").write_bytes(b"my picture")
    flags = _output_flags()
    # train's --out is the parent of its run folders: a run folder with outputs is refused without
    # --overwrite and one with a checkpoint always (test_a_folder_with_outputs_but_no_checkpoint_...).
    del flags["train"]
    assert {c for c, f in flags.items() if f} == {"export", "flops", "bench", "analyze", "check", "profile"}
    before = _snapshot(run)
    for command, options in flags.items():
        for flag in options:
            for name in (
                "checkpoint.pt",
                "config.yaml",
                "metrics.jsonl",
                "slim.pt",
                "report.md",
                "mine.json",
            ):
                argv = _writing_command(command, flag, run, run / name)
                if command == "analyze" and name != "mine.json":
                    continue  # analyze writes PNGs: mine.png below
                assert main(argv) == 2, argv
                err = capsys.readouterr().err
                assert "refusing to write" in err or "exists: give --overwrite" in err, (argv, err)
                assert _snapshot(run) == before, argv
    # --overwrite replaces the user's own file, never a run's resume files.
    assert main(["flops", str(run), "--out", str(run / "mine.json"), "--overwrite"]) == 0
    assert (run / "mine.json").read_text().startswith("{")
    assert main(["flops", str(run), "--out", str(run / "config.yaml"), "--overwrite"]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert main(["analyze", str(run), "--out", str(run / "mine.png"), "--overwrite"]) == 0


def test_a_folder_with_outputs_but_no_checkpoint_is_refused_unless_overwrite(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoint.pt").unlink()  # a run whose checkpoint was deleted: its outputs remain
    before = _snapshot(run)
    assert _train(tmp_path, "run") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(run) == before
    assert main(["train", "-q", "--out", str(tmp_path), "--overwrite", "--set", *TINY, "name=run"]) == 0


# ---------------------------------------------------------------- DDP: killed mid-epoch, resumed
def _ddp_resume_worker(rank: int, world: int, out: str) -> None:
    from chase.train import run as run_mod
    from chase.train.config import load_config

    sets = [*TINY, "synthetic_train=128", "out=" + out]
    run_mod.train(load_config([], [*sets, "name=whole"]))
    one_epoch = run_mod.train_one_epoch

    def dying_epoch(st, loader, steps, after_step):
        def after(s, loss):
            after_step(s, loss)
            if s.step == 3:  # every rank stops right after the mid-epoch checkpoint of step 3
                raise KeyboardInterrupt

        return one_epoch(st, loader, steps, after)

    run_mod.train_one_epoch = dying_epoch
    with contextlib.suppress(KeyboardInterrupt):
        run_mod.train(load_config([], [*sets, "name=killed"]))
    run_mod.train_one_epoch = one_epoch
    torch.distributed.barrier()  # rank 0 has finished writing the checkpoint
    run_dir = pathlib.Path(out) / "killed"
    run_mod.train(load_config([run_dir / "config.yaml"], []), run_dir, resume=True)


@pytest.mark.slow
def test_ddp_resume_mid_epoch_is_exact(tmp_path):
    """Two gloo processes, killed after a mid-epoch checkpoint and resumed: the same weights and the same
    epoch train loss/accuracy (every rank's partial sums) as the run that was never stopped."""
    import os

    import torch.multiprocessing as mp
    from tests.nets import in_process_group

    os.environ.setdefault("PYTHONPATH", os.getcwd())
    mp.spawn(
        in_process_group,
        args=(2, str(tmp_path / "init"), _ddp_resume_worker, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    a, b = torch.load(whole / "slim.pt", weights_only=True), torch.load(killed / "slim.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    def epochs(run):
        return [
            (r["train_loss"], r["train_acc"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "epoch"
        ]

    assert epochs(whole) == epochs(killed) and len(epochs(whole)) == 2


# ---------------------------------------------------------------- non-finite losses and weights
def test_a_channel_event_on_weights_that_are_not_finite_is_skipped_and_said():
    from tests.nets import tiny_chase

    model, _, sp = tiny_chase(torch.randn(2, 3, 16, 16), channel_sparsity=0.5)
    with torch.no_grad():
        model.block_a.weight[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="weights are not finite .* channel event skipped"):
        assert sp.remove_channels_now(sp.last_event) == 0
    assert sp.channel_sparsity_now() == 0


def test_a_diverging_run_stops_and_keeps_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The loss turns NaN in the second epoch: the run stops with one line once more than max_bad_steps
    steps were bad, writes no checkpoint over the first epoch's, and resumes from it."""
    from chase.train import loop

    real = loop.train_one_epoch

    def poisoned(st, loader, steps, after_step=None):
        if st.epoch == 1:  # from the second epoch on the model diverges
            with torch.no_grad():
                for p in st.module.parameters():
                    p.fill_(float("nan"))
        return real(st, loader, steps, after_step)

    monkeypatch.setattr("chase.train.run.train_one_epoch", poisoned)
    sets = [*TINY, "epochs=2", "log_every=1", "max_bad_steps=1"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert (
        "the loss was not finite" in err and "the last one resumes the run" in err and "\n" not in err.strip()
    )
    (run,) = tmp_path.iterdir()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
    )


def test_resuming_a_finished_run_without_its_metrics_says_what_is_lost(finished, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "metrics.jsonl").unlink()
    with caplog.at_level("WARNING"):
        assert main(["train", "-q", "--resume", str(run)]) == 0
    assert "metrics.jsonl is missing" in caplog.text
    assert "training_cost_note" in capsys.readouterr().out
    assert "no start record" in (run / "report.md").read_text()


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_checkpoint_is_named_and_said_to_be_truncated(finished, tmp_path, capsys, keep):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: int(len(data) * keep)])
    for argv in (
        ["train", "-q", "--resume", str(run)],
        ["flops", str(run)],
        ["export", str(run), "-o", str(tmp_path / "s.pt")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "checkpoint.pt is truncated or damaged" in err and "\n" not in err, (argv, err)
    sets = [*TINY, "name=warm", f"init_from={run / 'checkpoint.pt'}"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets]) == 2
    assert "truncated or damaged" in capsys.readouterr().err
    assert not (tmp_path / "warm").exists()


def test_more_unclear_inputs_say_what_and_where(finished, tmp_path, capsys, monkeypatch):
    """A binary config file, a pt2 export its writer cannot write, and a dataset with more classes than the
    classifier: one line naming the file or the counts, nothing written."""
    (tmp_path / "bin.yaml").write_bytes(b"\x00\xff\xfe\x80binary")
    assert main(["train", "-c", str(tmp_path / "bin.yaml")]) == 2
    assert f"{tmp_path / 'bin.yaml'} is not a text (YAML) config file" in capsys.readouterr().err

    def failing_save(program, f):
        raise RuntimeError("PytorchStreamWriter failed opening archive")

    monkeypatch.setattr(torch.export, "save", failing_save)
    out = tmp_path / "m.pt2"
    assert main(["export", str(finished), "--format", "pt2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write {out}" in err and "\n" not in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.pt2")]  # no temporary left


def test_a_dataset_with_more_classes_than_the_classifier_is_refused(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(3):
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "0.png")
    sets = ["dataset=imagefolder", f"data_dir={tmp_path / 'data'}", "num_classes=2", "method=dense", "name=x"]
    assert main(["train", "-q", "--out", str(tmp_path / "runs"), "--set", *sets, "image_size=8"]) == 2
    err = capsys.readouterr().err
    assert "num_classes=2, but the data has 3 classes" in err and not (tmp_path / "runs").exists()


def test_an_optimizer_replaced_after_the_sparsifier_is_detected_and_can_be_handed_over():
    """A new optimizer stepping the model's weights used to fail at the next shrink ("size of tensor a (6)
    must match (5)"): the sparsifier refuses at its next step, says what to do, and follows the new one
    after use_optimizer, through channel events."""
    from tests.nets import make_optimizer, tiny_chase, train_step

    model, _, sp = tiny_chase(torch.randn(2, 3, 16, 16), channel_sparsity=0.5)
    other = make_optimizer("adam", model)
    with pytest.raises(RuntimeError, match=r"another optimizer \(Adam\) stepped .*use_optimizer"):
        train_step(model, other, sp, 0)
    sp.use_optimizer(other)
    for i in range(1, 40):
        train_step(model, other, sp, i)
    assert sp.channel_sparsity_now() > 0.3
    for name, mask in sp.masks.items():
        assert not model.get_parameter(name)[~mask].any()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_jpeg_under_the_workers_loader_is_named_and_leaves_no_folder(tmp_path, capsys, workers):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, c * 90, 7)).save(folder / f"{i}.jpg")
    bad = tmp_path / "data" / "train" / "c1" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    sets = [
        "dataset=imagefolder",
        f"data_dir={tmp_path / 'data'}",
        "loader=workers",
        f"num_workers={workers}",
    ]
    sets += ["method=dense", "image_size=8", "batch_size=4", "epochs=1", "name=r", "tensorboard=false"]
    assert main(["train", "-q", "--out", str(tmp_path / "runs"), "--set", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot decode image {bad}" in err and "\n" not in err, err
    assert not (tmp_path / "runs" / "r").exists()  # nothing to resume: no half-made folder left behind
