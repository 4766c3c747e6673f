"""Exactness of the trainer's data: resumed runs see the same batches (both loaders, any number of workers),
BatchNorm recalibration does not depend on how the run was interrupted, and bad ImageFolder data is
refused with a message that names it."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

torch.set_num_threads(1)

pytest.importorskip("yaml")
pytest.importorskip("torchvision")

from chase.cli import main  # noqa: E402
from chase.slim import read_slim  # noqa: E402
from chase.train import run as run_mod  # noqa: E402
from chase.train.config import ConfigError, TrainConfig  # noqa: E402
from chase.train.data import build_data  # noqa: E402

# 64 images of 8x8 in batches of 16: 4 steps per epoch, 2 epochs (as tests/test_train.py's TINY).
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
    "lr=0.05",
    "speedup_batch=0",
    "log_every=1",
    "threads=1",
    "ckpt_every_steps=3",  # checkpoints at steps 3, 4 (epoch end), 6, 8 (epoch end)
]


def train(tmp_path: pathlib.Path, name: str, *sets: str) -> int:
    return main(["train", "-q", "--out", str(tmp_path), "--set", *TINY, f"name={name}", *sets])


def records(run: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def final(run: pathlib.Path) -> dict:
    return next(r for r in records(run) if r["kind"] == "final")


def killed_and_resumed(tmp_path: pathlib.Path, monkeypatch, name: str, step: int, *sets: str) -> pathlib.Path:
    """Run ``sets`` until the checkpoint of ``step`` is written, die there, and resume the run."""
    original = run_mod.save_checkpoint

    def save_then_die(st, path):
        original(st, path)
        if st.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, name, *sets)
    monkeypatch.setattr(run_mod, "save_checkpoint", original)
    assert main(["train", "-q", "--resume", str(tmp_path / name)]) == 0
    return tmp_path / name


@pytest.mark.parametrize("loader", ["resident", "workers"])
def test_bn_recalibration_is_the_same_after_a_resume(tmp_path, monkeypatch, loader):
    sets = ("bn_recalibrate=2", f"loader={loader}")
    assert train(tmp_path, "full", *sets) == 0
    expected = read_slim(tmp_path / "full" / "slim.pt")["model"]
    assert any("running_mean" in k for k in expected)
    # Stopped in the last epoch (step 6 of 8), and after the final checkpoint (before the report).
    for step in (6, 8):
        run = killed_and_resumed(tmp_path, monkeypatch, f"killed{step}", step, *sets)
        got = read_slim(run / "slim.pt")["model"]
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(got[k], v), f"{k} differs after a resume at step {step}"
        assert final(run)["slim_test_acc"] == final(tmp_path / "full")["slim_test_acc"]


def test_workers_loader_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    # Augmentation on (synthetic: random crop + flip); two worker processes alternate the batches.
    sets = ("loader=workers", "num_workers=2", "augment=cifar")
    assert train(tmp_path, "full", *sets) == 0
    run = killed_and_resumed(tmp_path, monkeypatch, "killed", 6, *sets)  # epoch 2, after its batch 2
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after resume"
    for k, v in a["sparsifier"]["masks"].items():
        assert torch.equal(v, b["sparsifier"]["masks"][k]), f"mask {k} differs after resume"


def _batches(loader) -> list[torch.Tensor]:
    return [x for x, _ in loader]


def test_workers_batches_depend_on_neither_workers_nor_start():
    def data(workers: int):
        cfg = TrainConfig(
            dataset="synthetic", image_size=8, synthetic_train=64, synthetic_test=8, batch_size=16,
            loader="workers", num_workers=workers, augment="cifar", method="dense",
        ).validate()  # fmt: skip
        return build_data(cfg)

    d0, d2 = data(0), data(2)
    for d in (d0, d2):
        d.train_sampler.set_epoch(1)
        d.train.generator.manual_seed(5)
    rng = torch.get_rng_state()
    full = _batches(d0.train)
    assert torch.equal(torch.get_rng_state(), rng)  # in-process loading leaves the global RNG alone
    assert all(torch.equal(a, b) for a, b in zip(full, _batches(d2.train), strict=True))
    d2.train_sampler.set_epoch(1, start=16)  # one batch already done: worker 0 now loads batch 1
    assert all(torch.equal(a, b) for a, b in zip(full[1:], _batches(d2.train), strict=True))


def _image_folder(root: pathlib.Path, classes: dict[str, tuple[str, ...]], fmt: str = "PNG") -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, names in classes.items():
        for c in names:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                arr = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(arr).save(folder / f"{i}.{fmt.lower()}", fmt)


def _cfg(root: pathlib.Path, **kw) -> TrainConfig:
    base = dict(
        dataset="imagefolder",
        data_dir=str(root),
        image_size=8,
        batch_size=4,
        num_workers=0,
        augment="none",
        method="dense",
    )
    return TrainConfig(**{**base, **kw}).validate()


def test_test_folder_with_other_classes_is_refused(tmp_path):
    _image_folder(tmp_path, {"train": ("cat", "dog"), "test": ("cat", "fox")})
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(tmp_path))
    assert "['cat', 'fox']" in str(e.value) and "['cat', 'dog']" in str(e.value)


def test_corrupt_jpeg_names_the_file(tmp_path):
    _image_folder(tmp_path, {"train": ("a", "b"), "test": ("a", "b")}, fmt="JPEG")
    bad = tmp_path / "train" / "b" / "2.jpeg"
    bad.write_bytes(bad.read_bytes()[:200])  # a download cut short
    with pytest.raises(ValueError) as e:
        build_data(_cfg(tmp_path, loader="resident"))
    assert str(bad) in str(e.value)
