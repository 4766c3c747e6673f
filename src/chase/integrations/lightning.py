"""A PyTorch Lightning callback that adds any chase sparsifier to a ``Trainer``.

    from chase.integrations.lightning import SparsityCallback
    cb = SparsityCallback(lambda model, opt: chase.RigL(model, opt, density=0.1, total_steps=trainer_steps))
    Trainer(callbacks=[cb]).fit(module)

The sparsifier is built at ``on_fit_start`` from the LightningModule and its single optimizer, and steps
in ``on_train_batch_end`` whenever the trainer's optimizer-step counter moved (so once per optimizer step
with ``accumulate_grad_batches``). Lightning clears gradients inside the NEXT step's closure, so they are
still there for an exploration update; ``on_before_zero_grad`` would be too late (it runs after the next
forward pass, whose saved tensors an update must not modify). Its state is saved in Lightning checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from chase.sparsifier import Sparsifier

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError(
            "chase.integrations.lightning needs PyTorch Lightning: "
            'pip install "chase-dst[lightning]" (it installs pytorch-lightning)'
        ) from e


class SparsityCallback(Callback):
    """Runs a chase sparsifier inside a Lightning ``Trainer``.

    Args:
        make_sparsifier: ``(module, optimizer) -> Sparsifier``, called once at the start of ``fit``.

    Limits: one optimizer; resuming from a checkpoint restores the sparsifier (masks, step, RNG) for the
    unstructured algorithms and for Chase with ``removal="mask"``; physically shrinking Chase runs cannot
    resume through Lightning (it loads the weights before any callback could narrow the model) nor shrink
    under a multi-process strategy (the strategy's DDP wrapper would need re-wrapping).
    """

    def __init__(self, make_sparsifier: Callable[[nn.Module, torch.optim.Optimizer], Sparsifier]) -> None:
        self.make_sparsifier = make_sparsifier
        self.sparsifier: Sparsifier | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step = 0

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"SparsityCallback supports one optimizer, the module has {len(trainer.optimizers)}"
            )
        if self.sparsifier is not None:  # a second fit: the previous sparsifier lets go of the model
            self.sparsifier.remove()
        self.sparsifier = self.make_sparsifier(pl_module, trainer.optimizers[0])
        self._last_step = trainer.global_step
        if self._pending is not None:
            self.sparsifier.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, *args: Any) -> None:
        if self.sparsifier is None or trainer.global_step <= self._last_step:
            return  # no optimizer step on this batch (gradient accumulation)
        self._last_step = trainer.global_step
        info = self.sparsifier.step()
        if info.shapes_changed and trainer.world_size > 1:
            raise RuntimeError(
                "channels were physically removed under a multi-process Lightning strategy, whose DDP "
                "wrapper cannot be rebuilt from a callback; use Chase(removal='mask') with Lightning DDP"
            )

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict() if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start builds the sparsifier: apply it there.
        self._pending = dict(state_dict) or None
