"""The Lightning callback on CPU (skipped when PyTorch Lightning is not installed)."""

from __future__ import annotations

import pytest
import torch
from tests.nets import TinyResNet
from torch import nn

import chase

pl = pytest.importorskip("pytorch_lightning")
from chase.integrations.lightning import SparsityCallback  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyResNet()

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


def _trainer(tmp_path, cb, epochs, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[cb],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


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

    cb2 = SparsityCallback(lambda m, o: chase.RigL(m, o, density=0.2, total_steps=16, update_every=3, seed=5))
    _trainer(tmp_path, cb2, epochs=2).fit(Module(), _loader(), ckpt_path=ckpt)
    assert cb2.sparsifier.step_count == 16  # resumed at 8, trained one more epoch
    assert any(not torch.equal(saved[n], m) for n, m in cb2.sparsifier.masks.items())
    assert set(before) == set(saved)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    cb = SparsityCallback(lambda m, o: chase.SET(m, o, density=0.2, total_steps=8, update_every=2))
    _trainer(tmp_path, cb, epochs=1, accumulate_grad_batches=2).fit(Module(), _loader())
    assert cb.sparsifier.step_count == 4
