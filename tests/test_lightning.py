"""The Lightning callback on CPU (skipped when PyTorch Lightning is not installed)."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.nets import TinyResNet
from torch import nn

import chase

pl = pytest.importorskip("pytorch_lightning")
from chase.integrations.lightning import (  # noqa: E402
    HISTORY_KEY,
    ChannelHistoryMixin,
    SparsityCallback,
    load_from_checkpoint,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyResNet()

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class ChaseModule(pl.LightningModule):
    """A module Chase can trace (it has forward) and Lightning can rebuild (its hyperparameters are saved)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyResNet(width=width)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class NoForward(pl.LightningModule):
    """Only training_step: channel discovery has nothing to run on the module itself."""

    def __init__(self):
        super().__init__()
        self.net = TinyResNet(width=16)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(tmp_path, cb, epochs, *, extra=(), **kw):
    options = {
        "max_epochs": epochs,
        "callbacks": [cb, *extra],
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**options, **kw})


def _chase(module, optimizer, example_inputs):
    """Chase over 3 epochs of 8 steps: channel events at steps 6, 10, 14 (S_c reached), 18; updates every
    4 steps."""
    return chase.Chase(
        module,
        optimizer,
        density=0.15,
        total_steps=24,
        update_every=4,
        example_inputs=example_inputs,
        channels=chase.ChannelSpec(channel_sparsity=0.5, channel_every=4, prune_skip=True),
    )


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """One uninterrupted Chase run of 3 epochs (physical removal), a checkpoint after every epoch, a CSV
    log of every step."""
    root = tmp_path_factory.mktemp("shrunk")
    torch.manual_seed(0)
    module, cb = ChaseModule(), SparsityCallback(_chase)
    saver = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    logger = pl.loggers.CSVLogger(root, name="log")
    trainer = _trainer(root, cb, epochs=3, extra=[saver], logger=logger, log_every_n_steps=1)
    trainer.fit(module, _loader())
    return {"root": root, "module": module, "cb": cb, "trainer": trainer, "logger": logger}


def test_callback_trains_sparse_and_resumes(tmp_path):
    torch.manual_seed(0)
    module = Module()
    cb = SparsityCallback(lambda m, o: chase.RigL(m, o, density=0.2, total_steps=16, update_every=3))
    _trainer(tmp_path, cb, epochs=1).fit(module, _loader())
    sp = cb.sparsifier
    assert sp.step_count == 8 and sp.kept == sp.budget
    for name, mask in sp.masks.items():
        assert name.startswith("net.")
        assert torch.all(module.get_parameter(name)[~mask] == 0)
    before = {n: m.clone() for n, m in sp.masks.items()}

    ckpt = tmp_path / "one.ckpt"
    trainer = _trainer(tmp_path, cb, epochs=1)
    trainer.fit(Module(), _loader(), ckpt_path=None)  # a fresh fit builds a fresh sparsifier
    assert cb.sparsifier.step_count == 8
    trainer.save_checkpoint(ckpt)
    saved = {n: m.clone() for n, m in cb.sparsifier.masks.items()}
    assert HISTORY_KEY not in torch.load(ckpt, weights_only=False)  # unstructured: nothing to narrow

    cb2 = SparsityCallback(lambda m, o: chase.RigL(m, o, density=0.2, total_steps=16, update_every=3, seed=5))
    _trainer(tmp_path, cb2, epochs=2).fit(Module(), _loader(), ckpt_path=ckpt)
    assert cb2.sparsifier.step_count == 16  # resumed at 8, trained one more epoch
    assert any(not torch.equal(saved[n], m) for n, m in cb2.sparsifier.masks.items())
    assert set(before) == set(saved)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    cb = SparsityCallback(lambda m, o: chase.SET(m, o, density=0.2, total_steps=8, update_every=2))
    _trainer(tmp_path, cb, epochs=1, accumulate_grad_batches=2).fit(Module(), _loader())
    assert cb.sparsifier.step_count == 4


def _widths(module):
    return {n: tuple(t.shape) for n, t in module.state_dict().items()}


def test_a_shrinking_run_resumes_bit_for_bit(shrunk, tmp_path):
    whole, whole_cb = shrunk["module"], shrunk["cb"]
    first = shrunk["root"] / "ckpt" / "epoch=0-step=8.ckpt"
    saved = torch.load(first, weights_only=False)
    # The checkpoint lies between channel events: one before it (step 6) and two after (10, 14) narrowed.
    at_checkpoint = {n: tuple(t.shape) for n, t in saved["state_dict"].items()}
    assert _widths(ChaseModule()) != at_checkpoint != _widths(whole)
    assert saved[HISTORY_KEY]["module"] == ""

    torch.manual_seed(1)  # another initialisation: the checkpoint's weights must be the ones trained on
    resumed, cb = ChaseModule(), SparsityCallback(_chase)
    trainer = _trainer(tmp_path, cb, epochs=3, enable_checkpointing=False)
    trainer.fit(resumed, _loader(), ckpt_path=first)

    assert trainer.global_step == 24 and cb.sparsifier.step_count == 24
    assert _widths(resumed) == _widths(whole)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for name, mask in whole_cb.sparsifier.masks.items():
        assert torch.equal(mask, cb.sparsifier.masks[name]), name
    history, other = whole_cb.sparsifier.export_history(), cb.sparsifier.export_history()
    for group, alive in history["channels"].items():
        assert torch.equal(alive, other["channels"][group]), group
    moments = [shrunk["trainer"].optimizers[0].state_dict(), trainer.optimizers[0].state_dict()]
    for key, state in moments[0]["state"].items():
        assert torch.equal(state["momentum_buffer"], moments[1]["state"][key]["momentum_buffer"])
    assert cb.sparsifier.optimizer is trainer.optimizers[0]  # the placeholder was handed over


def test_load_from_checkpoint_gives_the_narrow_module(shrunk, tmp_path):
    whole = shrunk["module"].eval()
    last = shrunk["root"] / "ckpt" / "epoch=2-step=24.ckpt"
    with pytest.raises(RuntimeError, match="size mismatch"):  # what the helper is for
        ChaseModule.load_from_checkpoint(last)

    x = torch.randn(4, 3, 16, 16)
    small = load_from_checkpoint(ChaseModule, last, map_location="cpu")
    assert type(small) is ChaseModule and small.hparams.width == 16
    assert _widths(small) == _widths(whole)
    with torch.no_grad():
        assert torch.equal(small.eval()(x), whole(x))

    class Mixed(ChannelHistoryMixin, ChaseModule):
        pass

    with torch.no_grad():
        assert torch.equal(Mixed.load_from_checkpoint(last).eval()(x), whole(x))

    # trainer.validate of a fresh module, with the callback: narrowed before the weights load, too
    cb = SparsityCallback(_chase)
    trainer = _trainer(tmp_path, cb, epochs=1)
    fresh = trainer.validate(ChaseModule(), _loader(), ckpt_path=last, verbose=False)
    again = _trainer(tmp_path, SparsityCallback(_chase), epochs=1).validate(whole, _loader(), verbose=False)
    assert fresh[0]["val_loss"] == pytest.approx(again[0]["val_loss"], abs=1e-6)


def test_density_channels_and_macs_reach_the_logger(shrunk):
    sp, module = shrunk["cb"].sparsifier, shrunk["module"]
    metrics = shrunk["trainer"].callback_metrics
    assert float(metrics["chase/density"]) == pytest.approx(sp.global_density(), abs=1e-6)
    assert float(metrics["chase/channel_sparsity"]) == pytest.approx(sp.channel_sparsity_now(), abs=1e-6)
    macs = chase.count_flops(module, torch.zeros(1, 3, 16, 16)).dense
    assert float(metrics["chase/macs"]) == pytest.approx(macs, rel=1e-6)

    with open(pathlib.Path(shrunk["logger"].log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("chase/macs")]
    assert len(rows) == 24  # one row per optimizer step
    by_step = [float(r["chase/macs"]) for r in rows]
    dense = chase.count_flops(TinyResNet(width=16), torch.zeros(1, 3, 16, 16)).dense
    assert by_step[0] == dense and by_step[-1] == macs < dense
    assert by_step == sorted(by_step, reverse=True) and len(set(by_step)) == 4  # dense, 3 events
    sparsities = [float(r["chase/channel_sparsity"]) for r in rows]
    assert sparsities[4] == 0 < sparsities[5]  # the first event comes after step 6 (row 5)


def test_a_module_without_forward_is_told_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"NoForward has no forward\(\).*define forward\(\)"):
        _trainer(tmp_path, SparsityCallback(_chase), epochs=1).fit(NoForward(), _loader())

    seen = []

    def on_the_net(module, optimizer, x):
        seen.append(x)
        return _chase(module.net, optimizer, x)

    module, cb = NoForward(), SparsityCallback(on_the_net)
    trainer = _trainer(tmp_path, cb, epochs=1)
    trainer.fit(module, _loader())
    assert torch.equal(seen[0], next(iter(_loader()))[0])  # the x of the first (x, y) batch
    assert module.net.conv1.weight.shape[0] < 16  # the event at step 6 shrank it
    ckpt = tmp_path / "net.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)[HISTORY_KEY]["module"] == "net"
    assert _widths(load_from_checkpoint(NoForward, ckpt)) == _widths(module)


def test_example_input_array_goes_to_a_keyword_factory(tmp_path):
    seen = []

    def factory(module, optimizer, *, example_inputs):
        seen.append(example_inputs)
        return _chase(module, optimizer, example_inputs)

    module = ChaseModule()
    module.example_input_array = torch.zeros(2, 3, 16, 16)
    cb = SparsityCallback(factory, log_prefix=None)
    trainer = _trainer(tmp_path, cb, epochs=1)
    trainer.fit(module, _loader())
    assert seen == [module.example_input_array]
    assert not any(k.startswith("chase/") for k in trainer.callback_metrics)
    with pytest.raises(RuntimeError, match="during fit"):
        cb.example_inputs  # noqa: B018 -- only the trainer's data can tell


DDP_SCRIPT = """
import sys

import pytorch_lightning as pl
import torch
from torch import nn

import chase
from chase.integrations.lightning import SparsityCallback
from tests.nets import TinyResNet


class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyResNet(width=16)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Dump(pl.Callback):
    def on_train_start(self, trainer, module):
        self.first_wrapper = trainer.strategy.model

    def on_train_end(self, trainer, module):
        sp = cb.sparsifier
        torch.save(
            {
                # DDP broadcasts buffers (BatchNorm statistics) from rank 0 at each forward: the last
                # forward's are each rank's own; parameters are averaged and must agree.
                "params": {n: p.detach() for n, p in module.named_parameters()},
                "shapes": {n: tuple(t.shape) for n, t in module.state_dict().items()},
                "masks": sp.masks,
                "channels": sp.export_history()["channels"],
                "steps": (trainer.global_step, sp.step_count),
                "wrapper": type(trainer.strategy.model).__name__,
                "rebuilt": trainer.strategy.model is not self.first_wrapper,
                "world": trainer.world_size,
            },
            f"{sys.argv[1]}/rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 4 steps per epoch on each of 2 ranks
    spec = chase.ChannelSpec(channel_sparsity=0.5, channel_every=2, prune_skip=True)  # events: 3, 5, 7, 9
    cb = SparsityCallback(
        lambda m, o, x: chase.Chase(
            m, o, density=0.3, total_steps=12, update_every=2, example_inputs=x, channels=spec
        )
    )
    trainer = pl.Trainer(
        strategy="ddp", devices=2, accelerator="cpu", max_epochs=3, callbacks=[cb, Dump()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=sys.argv[1],
    )
    trainer.fit(M(), loader)
"""


def test_ddp_rebuilds_its_wrapper_after_each_shrink_and_ranks_agree(tmp_path):
    """strategy="ddp" on 2 CPU processes (gloo): Lightning starts rank 1 by running the script again."""
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for out in ranks:
        assert out["world"] == 2 and out["wrapper"] == "DistributedDataParallel" and out["rebuilt"]
        assert out["steps"] == (12, 12)  # trained on after the last event (step 9)
    a, b = ranks
    assert a["shapes"] == b["shapes"] != _widths(ChaseModule())  # shrunk alike
    for name, tensor in a["params"].items():
        assert torch.equal(tensor, b["params"][name]), name
    for name, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][name]), name
    for group, alive in a["channels"].items():
        assert torch.equal(alive, b["channels"][group]), group


def test_a_two_argument_factory_reads_example_inputs_and_the_rng_stays(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)  # draws from the global RNG
    kept = []

    def factory(module, optimizer):
        before = torch.get_rng_state()
        x = cb.example_inputs
        kept.append(torch.equal(before, torch.get_rng_state()) and cb.example_inputs is x)
        return _chase(module, optimizer, x)

    cb = SparsityCallback(factory)
    trainer = _trainer(tmp_path, cb, epochs=1)
    trainer.fit(ChaseModule(), loader)
    assert kept == [True]
    assert "chase/macs" in trainer.callback_metrics  # the input found is also the one MACs count on


def test_mask_mode_keeps_shapes_and_logs_the_macs_of_its_export(tmp_path):
    def masking(module, optimizer, x):
        spec = chase.ChannelSpec(channel_sparsity=0.5, channel_every=4, prune_skip=True, removal="mask")
        return chase.Chase(
            module, optimizer, density=0.15, total_steps=24, update_every=4, example_inputs=x, channels=spec
        )

    module, cb = ChaseModule(), SparsityCallback(masking)
    trainer = _trainer(tmp_path, cb, epochs=1)
    trainer.fit(module, _loader())  # one channel event, at step 6
    assert _widths(module) == _widths(ChaseModule())
    macs = chase.count_flops(cb.sparsifier.export(), torch.zeros(1, 3, 16, 16)).dense
    assert float(trainer.callback_metrics["chase/macs"]) == pytest.approx(macs, rel=1e-6)
    assert macs < chase.count_flops(module, torch.zeros(1, 3, 16, 16)).dense
    trainer.save_checkpoint(tmp_path / "mask.ckpt")
    assert HISTORY_KEY not in torch.load(tmp_path / "mask.ckpt", weights_only=False)  # full-size weights
