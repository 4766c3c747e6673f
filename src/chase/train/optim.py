"""Optimizer and per-step LR schedule (linear warm-up, then cosine, step or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from chase.train.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    if not cfg.no_bn_decay:
        return [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    # Biases and norm weights are 1-D: the ImageNet recipe does not decay them.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over ``model``'s parameters."""
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        passed = sum(step >= m * steps_per_epoch for m in cfg.milestones)
        return cfg.gamma**passed
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch))
