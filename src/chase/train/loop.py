"""One epoch of training and an evaluation pass, in the style of torchvision's references.

The loop calls ``sparsifier.step()`` after ``optimizer.step()`` and before ``zero_grad()`` (updates read
the gradients); when a channel event changed parameter shapes it re-wraps DDP and re-compiles.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

import chase
from chase.sparsifier import registry
from chase.train.config import SCHEDULE_INTERVALS, ConfigError, TrainConfig
from chase.train.data import batches
from chase.train.distributed import Dist, wrap_ddp

log = logging.getLogger(__name__)

__all__ = ["DivergedError", "TrainState", "build_sparsifier", "check_finite", "evaluate", "train_one_epoch"]


def build_sparsifier(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    steps_per_epoch: int,
    image_size: int,
) -> Optional[chase.Sparsifier]:
    """The sparsifier ``cfg.method`` names (None for dense): its typed option specs built from the config,
    schedule points given in epochs converted to optimizer steps."""
    if cfg.method == "dense":
        return None
    kw = cfg.sparsifier_options(steps_per_epoch)
    for key in SCHEDULE_INTERVALS:
        if cfg.library_options().get(key) is not None and getattr(cfg, f"{key}_epochs") > 0:
            log.warning(
                "%s_epochs=%g (%d steps) is used, not %s", key, getattr(cfg, f"{key}_epochs"), kw[key], key
            )
    ignored = sorted(
        k
        for k, v in cfg.library_options().items()
        if v not in (None, False, []) and k not in cfg.method_options()
    )
    if ignored:
        log.info("method %s does not take %s: left out", cfg.method, ", ".join(ignored))
    kw = {k: v for k, v in kw.items() if k in cfg.method_options() or k not in cfg.library_options()}
    try:
        typed = registry.specs(cfg.method, kw)
        kw = {k: v for k, v in kw.items() if k not in registry.CHANNEL_OPTIONS}
        if registry.takes(cfg.method, "example_inputs"):
            # Channel groups are traced once from an example input; its values do not matter, and a
            # private generator keeps the global RNG (data augmentation, dropout) untouched.
            kw["example_inputs"] = torch.randn(
                1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
            )
        return registry.create(
            cfg.method, module, optimizer, total_steps=cfg.epochs * steps_per_epoch, **kw, **typed
        )
    except ValueError as e:  # the library validates its options; here they came from the config
        raise ConfigError(f"method {cfg.method}: {e}") from e


@dataclass
class TrainState:
    """Everything the loop mutates. ``module`` is the bare model; ``model`` is what runs the forward
    (``module`` itself, or wrapped in DDP and/or ``torch.compile``)."""

    cfg: TrainConfig
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: Optional[chase.Sparsifier]
    dist: Dist
    scaler: Optional[torch.amp.GradScaler] = None
    #: what rebuilding model and sparsifier needs without the data (steps_per_epoch, num_classes, image_size)
    meta: dict[str, int] = field(default_factory=dict)
    model: nn.Module = field(init=False)
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches finished in the current epoch
    step: int = 0  # optimizer steps finished
    #: this epoch's running sums (loss, correct, count); a tensor so that no step waits for the device.
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    #: what the sparsifier did at the last step (None for dense training)
    last_info: Optional[chase.StepInfo] = None
    #: optimizer steps of this process whose loss was not finite (a device tensor: counted without a sync)
    bad_steps: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    def __post_init__(self) -> None:
        self.sums = self.sums.to(self.device)
        self.bad_steps = self.bad_steps.to(self.device)
        self.wrap()

    def wrap(self) -> None:
        """(Re-)build the forward wrapper: DDP's buckets and compiled graphs are sized for the old shapes."""
        model = wrap_ddp(self.module, self.dist)
        if self.cfg.compile:
            torch._dynamo.reset()  # drop graphs guarded on the old shapes instead of piling up recompiles
            model = torch.compile(model)
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.dist.device


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _to(x: torch.Tensor, y: torch.Tensor, st: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(st.device, non_blocking=True)
    if st.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(st.device, non_blocking=True)


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def train_one_epoch(
    st: TrainState,
    loader: torch.utils.data.DataLoader,
    steps_per_epoch: int,
    after_step: Optional[Callable[[TrainState, torch.Tensor], None]] = None,
) -> dict[str, float]:
    """Train until the epoch's ``steps_per_epoch`` batches are done (continuing from ``st.batch``).

    Returns the epoch's mean training loss and accuracy (summed over ranks).
    """
    cfg = st.cfg
    st.model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bar = _progress(
        steps_per_epoch, st.batch, f"epoch {st.epoch + 1}/{cfg.epochs}", st.dist.main and not cfg.quiet
    )
    sums = st.sums
    seen, start = 0, time.perf_counter()
    for x, y in batches(loader):
        if st.batch >= steps_per_epoch:
            break
        x, y = _to(x, y, st)
        with autocast(cfg, st.device):
            out = st.model(x)
            loss = criterion(out, y)
        if st.scaler is not None:
            st.scaler.scale(loss).backward()
            st.scaler.unscale_(st.optimizer)  # the sparsifier ranks true gradients
            st.scaler.step(st.optimizer)
            st.scaler.update()
        else:
            loss.backward()
            st.optimizer.step()
        info = st.last_info = st.sparsifier.step() if st.sparsifier is not None else None
        st.optimizer.zero_grad(set_to_none=True)
        st.scheduler.step()
        st.step += 1
        st.batch += 1
        with torch.no_grad():
            st.bad_steps += (~torch.isfinite(loss.detach())).long()
            sums += torch.stack(
                [
                    loss.detach().double() * len(y),
                    (out.argmax(1) == y).sum().double(),
                    sums.new_tensor(len(y)),
                ]
            )
        if info is not None and info.shapes_changed:
            st.wrap()
            log.info("step %d: %d channels removed, model re-wrapped", st.step, info.channels_removed)
        seen += len(y)
        if bar is not None:
            bar.update(1)
            if st.batch % 10 == 0 or st.batch == steps_per_epoch:
                rate = seen * st.dist.world / (time.perf_counter() - start)
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    acc=f"{float(sums[1] / sums[2].clamp(min=1)):.3f}",
                    img_s=f"{rate:.0f}",
                )
        if after_step is not None:
            after_step(st, loss.detach())
        if cfg.log_every and st.step % cfg.log_every == 0:  # a sync every log_every steps, not every step
            check_finite(st)
    if bar is not None:
        bar.close()
    check_finite(st)
    loss_sum, correct, count = st.dist.all_sum(sums.tolist())
    return {"loss": loss_sum / max(1, count), "acc": correct / max(1, count)}


class DivergedError(ValueError):
    """Training stopped: too many steps had a loss that was not finite (a ValueError: the command line
    prints it in one line, as a run's problem rather than a bug)."""


def check_finite(st: TrainState) -> None:
    """Stop the run (:class:`DivergedError`) once more than ``max_bad_steps`` steps had a loss that was not
    finite (NaN/Inf: divergence, fp16 overflow); the last checkpoint, written before, is not replaced."""
    limit = st.cfg.max_bad_steps
    if not limit:
        return
    bad = int(st.dist.all_sum([float(st.bad_steps)])[0]) if st.dist.enabled else int(st.bad_steps)
    if bad > limit:
        raise DivergedError(
            f"the loss was not finite (NaN/Inf) at {bad} optimizer steps, more than max_bad_steps="
            f"{limit}; stopped at step {st.step} without writing a checkpoint: the last one resumes the "
            "run. Lower the learning rate, use amp=bf16, or raise max_bad_steps"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: torch.utils.data.DataLoader, cfg: TrainConfig, d: Dist
) -> dict[str, float]:
    """Mean loss and top-1 accuracy over the whole split (exact counts summed over ranks)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, d.device):
            out = model(x)
        sums += torch.stack(
            [criterion(out.float(), y).double(), (out.argmax(1) == y).sum().double(), sums.new_tensor(len(y))]
        )
    loss_sum, correct, count = d.all_sum(sums.tolist())
    return {"loss": loss_sum / max(1, count), "acc": correct / max(1, count)}
