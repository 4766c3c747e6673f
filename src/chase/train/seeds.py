"""Every seed the trainer derives from ``cfg.seed``. Exact resume depends on these formulas: a resumed run
must draw the same numbers as the run that wrote the checkpoint, so they live here once."""

from __future__ import annotations

__all__ = ["batch_seed", "epoch_seed", "rank_seed", "recalibration_seed", "sample_seed", "split_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The data order (sampler shuffle) and loader generator of ``epoch``: the same on every rank."""
    return seed * 100003 + epoch


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The global RNG of a rank other than 0 (augmentation, dropout differ per rank); ``step`` > 0 after a
    resume, whose checkpoint holds rank 0's streams only."""
    return seed + 1000 * rank + step


def batch_seed(epoch_generator_seed: int, batch: int, rank: int) -> int:
    """The crop/flip draws of batch ``batch`` of an epoch (resident loader), whatever batch the iteration
    starts at."""
    return ((epoch_generator_seed * 1_000_003 + batch) * 1009 + rank) % 2**63


def sample_seed(order_seed: int, position: int) -> int:
    """The augmentation draws of the sample at ``position`` of an epoch's order (``order_seed``: the epoch's
    :func:`epoch_seed`; positions count over all ranks) in the DataLoader loader, whatever worker loads it
    and whatever sample the iteration starts at."""
    return (order_seed * 1_000_033 + position) % 2**63


def recalibration_seed(seed: int) -> int:
    """The global RNG (dropout, augmentation) while the slim model's BatchNorm statistics are re-estimated
    at the end of a run: the same however the run was interrupted and resumed."""
    return seed + 13


def split_seed(seed: int) -> int:
    """The fixed train/validation split, independent of the training order."""
    return seed + 7
