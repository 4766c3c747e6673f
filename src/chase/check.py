"""Does Chase work on this model? Build, train a few steps through channel events, shrink, export, reload.

``check_model`` runs the whole life of a Chase run in miniature on any model: channel discovery, a few
optimizer steps on random data with channel events at the given ``channel_sparsity`` and physical
removal, :meth:`chase.Chase.export`, :func:`chase.load_slim` into a freshly built model, and a comparison of
its outputs with the trained model's (eval mode). The report says what was found and what it cost; a
failure is reported with its exception, classified as a clear refusal (a ``ValueError`` raised by this
library, with a message) or a crash (anything else: a bug to fix). ``benchmarks/coverage.py`` runs it over
every torchvision classifier and a list of timm models; ``chase check`` runs it from the command line.
"""

from __future__ import annotations

import logging
import pathlib
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from chase.flops import count_flops
from chase.nested import map_tensors
from chase.slim import load_slim
from chase.sparsifier import Budget, ChannelSpec, Chase
from chase.sparsifier.specs import resolve_specs

log = logging.getLogger(__name__)

__all__ = ["CheckReport", "check_model", "output_loss"]

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)


@dataclass
class CheckReport:
    """What :func:`check_model` found. ``status`` is ``"pass"``, ``"refused"`` (a clear error from this
    library: ``error`` says what is not supported and why) or ``"crash"`` (any other exception)."""

    status: str = "pass"
    groups: int = 0
    prunable_groups: int = 0
    prunable_channels: int = 0
    channel_sparsity: float = 0.0
    head_groups: int = 0  # prunable attention-head groups (prune_heads)
    heads_removed: int = 0  # head units (key/value heads with their query heads) removed
    params_dense: int = 0
    params_slim: int = 0
    macs_dense: int = 0
    macs_slim: int = 0
    max_abs_diff: float = 0.0
    rel_diff: float = 0.0
    seconds_build: float = 0.0
    seconds_train: float = 0.0
    seconds_total: float = 0.0
    stage: str = ""  # where a failure happened: build, train, export, reload, compare
    error: str = ""
    error_type: str = ""
    warnings: list[str] = field(default_factory=list)
    kept: str = ""  # why channel groups are kept, counted by cause (ChannelGraph.why_kept)
    explain: str = ""  # the channel graph, a line per group with why a kept one is kept (its summary)

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.ok:
            return f"{self.status} at {self.stage}: {self.error_type}: {self.error}"
        ratio = self.params_slim / self.params_dense if self.params_dense else 1.0
        macs = self.macs_slim / self.macs_dense if self.macs_dense else 1.0
        if not self.prunable_groups:  # it ran and reloads, but no channel can go: say that first
            return (
                f"pass, but nothing to remove: none of the {self.groups} channel groups is prunable (only "
                f"unstructured sparsity); the reloaded model matches (max |diff| {self.max_abs_diff:.2e}); "
                "chase check --explain says why each group is kept"
            )
        return (
            f"pass: {self.prunable_groups} of {self.groups} channel groups prunable "
            f"({self.prunable_channels} channels), {100 * self.channel_sparsity:.0f}% removed; "
            f"slim model {ratio:.3f}x the parameters, {macs:.3f}x the MACs; "
            f"reloaded slim model matches (max |diff| {self.max_abs_diff:.2e}) in {self.seconds_total:.1f} s"
        )


def _tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (a tensor, a tuple/list, a dict, or a dataclass-like)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    if hasattr(out, "__dict__"):
        return [t for o in vars(out).values() for t in _tensors(o)]
    return []


def _classify(e: BaseException) -> str:
    """A ValueError raised inside this library is a clear refusal; anything else is a crash."""
    if not isinstance(e, ValueError):
        return "crash"
    frames = traceback.extract_tb(e.__traceback__)
    inside = bool(frames) and str(pathlib.Path(frames[-1].filename).resolve()).startswith(_PACKAGE_DIR)
    return "refused" if inside else "crash"


def _random_like(x: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random batch like ``x``: normal values, or for integer inputs (token ids) ids below its max + 1."""
    if x.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=x.dtype)
    return torch.randint(0, int(x.max()) + 1, shape, generator=gen, dtype=x.dtype)


def _random_batch(example: Any, batch_size: int, gen: torch.Generator) -> Any:
    """Random inputs like ``example``: a tensor's batch of ``batch_size``; for the nested arguments of a
    model that takes more than one tensor (a detector's list of images), each tensor at its own shape."""
    if isinstance(example, torch.Tensor):
        return _random_like(example, (batch_size, *example.shape[1:]), gen)
    return map_tensors(example, lambda t: _random_like(t, tuple(t.shape), gen))


def _forward(model: nn.Module, inputs: Any) -> Any:
    """``model`` on ``inputs`` as :func:`chase.channel_groups` takes them: a tensor, a tuple of positional
    arguments or a dict of keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def output_loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The default training loss of :func:`check_model`: any model, no labels, no assumption of a
    classifier; the mean square of every floating output, so that every output's layers get gradients."""
    return sum(o.float().pow(2).mean() for o in _tensors(_forward(model, inputs)))


#: what ``chase check`` removes unless told otherwise: half of the prunable channels.
CHECK_CHANNELS = ChannelSpec(channel_sparsity=0.5)


def check_model(
    build: Callable[[], nn.Module],
    example_inputs: Any,
    channels: Optional[ChannelSpec] = None,
    budget: Optional[Budget] = None,
    *,
    loss: Callable[[nn.Module, Any], torch.Tensor] = output_loss,
    density: float = 0.2,
    steps: int = 8,
    batch_size: int = 2,
    lr: float = 0.01,
    seed: int = 0,
    tolerance: float = 1e-4,
    **flat: Any,
) -> CheckReport:
    """Run a miniature Chase run on ``build()`` and report (never raises for a model's failure).

    Args:
        build: returns a freshly initialised model; called twice (the trained one, the reload target)
            with the same global seed, so both start identical.
        example_inputs: one input batch (its shape is reused for the random training batches), or the
            nested arguments of a model that takes several (a tuple of positional arguments, a dict of
            keyword arguments: a detector's ``([image, ...],)``), each tensor at the shape to train on.
        loss: ``loss(model, inputs)`` of one training step on random ``inputs`` like the example; the
            default, :func:`output_loss`, reaches every output. A detector's: its loss dict's sum for
            random targets (the model is in train mode; outputs are compared in eval mode).
        channels, budget: Chase's options (default :data:`CHECK_CHANNELS`: half of the prunable channels);
            the check runs its own schedule, so their schedule fields do not apply. ``**flat``: those
            options as flat keywords (deprecated).
        density: Chase's weight density.
        steps: optimizer steps; updates every 2 steps and a channel event every step from step 2 on, so
            the whole channel schedule runs (at least 6 steps).
        batch_size: images per random training batch.
        tolerance: largest allowed ``max |slim - trained| / max |trained|`` in eval mode.
    """
    if channels is None and flat:
        flat.setdefault("channel_sparsity", CHECK_CHANNELS.channel_sparsity)
    elif channels is None:
        channels = CHECK_CHANNELS
    channels, budget = resolve_specs(channels, budget, flat, caller="check_model")
    channels = channels.replace(channel_every=1, channel_end=None)
    if steps < 6:
        raise ValueError(f"steps must be >= 6 for a complete channel schedule, got {steps}")
    rep = CheckReport()
    start = time.perf_counter()
    rep.stage = "build"
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(rep, build, example_inputs, channels, budget, loss, density, steps, (batch_size, lr, seed))
        if rep.rel_diff > tolerance:
            rep.status, rep.error_type = "crash", "MismatchError"
            rep.error = f"the reloaded slim model differs from the trained one (relative {rep.rel_diff:.2e})"
        else:
            rep.stage = ""
    except Exception as e:  # the report carries any failure: this is a diagnostic
        rep.status, rep.error_type, rep.error = _classify(e), type(e).__name__, str(e)
        log.debug("check_model failed at %s", rep.stage, exc_info=True)
    rep.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:10]
    rep.seconds_total = time.perf_counter() - start
    return rep


def _run(
    rep: CheckReport,
    build: Callable[[], nn.Module],
    x: Any,
    channels: ChannelSpec,
    budget: Budget,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    density: float,
    steps: int,
    run: tuple[int, float, int],
) -> None:
    batch_size, lr, seed = run
    t = time.perf_counter()
    torch.manual_seed(seed)
    model = build()
    rep.params_dense = sum(p.numel() for p in model.parameters())
    probe = x[:1] if isinstance(x, torch.Tensor) else x
    model.eval()
    with torch.no_grad():
        rep.macs_dense = count_flops(model, probe).dense
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sp = Chase(
        model,
        opt,
        density=density,
        total_steps=steps,
        example_inputs=probe,
        channels=channels,
        budget=budget,
        update_every=2,
    )
    rep.groups, rep.prunable_groups = len(sp.graph), len(sp.groups)
    rep.kept, rep.explain = sp.graph.why_kept(), sp.graph.summary()
    rep.prunable_channels = sp.total_channels
    rep.seconds_build = time.perf_counter() - t

    rep.stage, t = "train", time.perf_counter()
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        loss = loss_fn(model, _random_batch(x, batch_size, gen))
        loss.backward()
        opt.step()
        sp.step()
        opt.zero_grad(set_to_none=True)
    rep.channel_sparsity = sp.channel_sparsity_now()
    heads = [g for g in sp.groups if g.kind == "heads"]
    rep.head_groups = len(heads)
    rep.heads_removed = sum(g.width - sp.pruner.surgery.current_width(g.name) for g in heads)
    rep.seconds_train = time.perf_counter() - t

    rep.stage = "export"
    model.eval()
    slim = sp.export().eval()
    ckpt = sp.slim_checkpoint()
    rep.stage = "reload"
    torch.manual_seed(seed)
    fresh = load_slim(build(), ckpt).eval()
    rep.params_slim = sum(p.numel() for p in fresh.parameters())
    rep.stage = "compare"
    with torch.no_grad():
        rep.macs_slim = count_flops(fresh, probe).dense
        batch = _random_batch(x, batch_size, gen)
        ref = _tensors(_forward(model, batch))
        for out in (_tensors(_forward(slim, batch)), _tensors(_forward(fresh, batch))):
            if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(out, ref)):
                raise RuntimeError("the slim model's outputs have other shapes than the trained model's")
            for a, b in zip(out, ref):
                diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
                scale = float(b.float().abs().max()) if b.numel() else 0.0
                rep.max_abs_diff = max(rep.max_abs_diff, diff)
                rep.rel_diff = max(rep.rel_diff, diff / scale if scale > 0 else diff)
