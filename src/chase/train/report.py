"""The end of a run: the final model's numbers, its file, a measured speedup, the plots and ``report.md``.

:func:`finish` calls one function per concern: :func:`final_metrics` (test accuracy and size of the model
to deploy), :func:`save_model` (the slim file, :mod:`chase.slim`), :func:`measure_speedup` (timing),
:func:`draw_plots` and :func:`write_report`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import pathlib
import statistics
from typing import Any, Optional

import torch
from torch import nn

from chase.flops import count_flops
from chase.models import get_model
from chase.slim import cpu_state_dict, save_slim
from chase.timing import alternate
from chase.train.config import TrainConfig
from chase.train.data import Data
from chase.train.distributed import Dist
from chase.train.loop import TrainState, autocast, evaluate
from chase.train.metrics import read_metrics, training_cost

log = logging.getLogger(__name__)

__all__ = [
    "draw_plots",
    "final_metrics",
    "finish",
    "measure_speedup",
    "recalibrate_bn",
    "save_model",
    "write_report",
]

SLIM_FILE, FINAL_FILE, REPORT_FILE = "slim.pt", "final.pt", "report.md"


def finish(
    st: TrainState, data: Data, test: dict[str, float], run_dir: pathlib.Path, initial: dict[str, Any]
) -> dict[str, Any]:
    """Evaluate, save and time the final model; rank 0 writes the model file, plots and ``report.md``."""
    cfg, d = st.cfg, st.dist
    results, exported = final_metrics(st, data, test)
    if d.main:
        results["model_file"] = save_model(st, exported, run_dir, data)
        if exported is not st.module and cfg.speedup_batch > 0:
            dense = get_model(cfg.model, num_classes=data.num_classes).to(d.device)
            if _same_shapes(dense, exported):  # no channel removed: timing noise is not a speedup
                results["speedup_note"] = "the slim network is the dense one (no channel was removed)"
            else:
                results.update(measure_speedup(dense, exported, cfg.speedup_batch, data.image_size, cfg))
        cost = training_cost(read_metrics(run_dir), st.step, cfg.batch_size * d.world)
        if not cost:  # a resumed run whose metrics.jsonl was deleted or emptied: say what is missing
            results["training_cost_note"] = (
                "not reported: metrics.jsonl has no start record (deleted or emptied before a resume)"
            )
            log.warning("training cost %s", results["training_cost_note"])
        results.update(cost)
        widths = {n: int(p.shape[0]) for n, p in st.module.named_parameters() if p.ndim > 1}
        before = initial.get("widths", {})
        options = st.sparsifier.describe() if st.sparsifier is not None else ""
        write_report(run_dir, cfg, results, before, widths, draw_plots(st, run_dir, before, widths), options)
        log.info("report written to %s", run_dir / REPORT_FILE)
    return results


def final_metrics(st: TrainState, data: Data, test: dict[str, float]) -> tuple[dict[str, Any], nn.Module]:
    """The run's results and the model to deploy: the slim export (BatchNorm recalibrated, evaluated on
    the test split) when the method removed channels, else the trained model itself."""
    cfg, sp, d = st.cfg, st.sparsifier, st.dist
    size = data.image_size
    results: dict[str, Any] = {
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "steps": st.step,
        "density": sp.global_density() if sp is not None else 1.0,
    }
    example = torch.zeros(1, 3, size, size, device=d.device)
    dense_ref = get_model(cfg.model, num_classes=data.num_classes)
    results["params_dense"] = _params(dense_ref)
    results["macs_dense"] = count_flops(dense_ref.to(d.device), example).dense
    exported: nn.Module = st.module
    if sp is not None and sp.removes_channels:
        results["channel_sparsity"] = sp.channel_sparsity_now()
        exported = sp.export().to(d.device)
        recalibrate_bn(exported, data.train, cfg.bn_recalibrate, cfg, d)
        slim_test = evaluate(exported, data.test, cfg, d)
        results.update(
            slim_test_acc=slim_test["acc"],
            slim_test_loss=slim_test["loss"],
            params_slim=_params(exported),
            macs_slim=count_flops(exported, example).dense,
            macs_sparse=count_flops(exported, example, masks=sp.masks).sparse,
        )
        results["macs_ratio"] = results["macs_slim"] / results["macs_dense"]
        if getattr(sp.pruner, "cost", None) is not None:  # a cost model pruned the run: check its prediction
            results.update(latency_check(sp, exported, data.image_size, d))
    if sp is not None:
        from chase.analysis import amenable_record

        results.update(amenable_record(sp))  # the amenable family of the final masks
    return results, exported


def save_model(st: TrainState, exported: nn.Module, run_dir: pathlib.Path, data: Data) -> str:
    """Write the exported model as a slim checkpoint (``slim.pt`` when channels were removed, else
    ``final.pt``: the masked weights); returns the file name."""
    cfg, sp = st.cfg, st.sparsifier
    meta = {
        "model": cfg.model,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
        "method": cfg.method,
    }
    if sp is None:
        from chase.slim import make_slim

        ckpt = make_slim(st.module, masks={}, meta=meta)
    else:
        ckpt = sp.slim_checkpoint(meta)
        if exported is not st.module:  # BatchNorm statistics may have been recalibrated on the export
            ckpt["model"] = cpu_state_dict(exported)
    name = SLIM_FILE if exported is not st.module else FINAL_FILE
    save_slim(ckpt, run_dir / name)
    return name


def latency_check(sp: Any, exported: nn.Module, size: int, d: Dist) -> dict[str, Any]:
    """A run pruned by a cost model (``target="latency"``, ``channel_rank="latency_weighted"``): the time
    it predicts for the final widths, next to the time measured here at its batch size and dtype (when
    this is its kind of device)."""
    from chase.bench import DTYPES
    from chase.timing import time_forward

    cost = sp.pruner.cost
    out: dict[str, Any] = {
        "latency_dense_ms_table": cost.dense_ms,
        "latency_predicted_ms": sp.predicted_ms(),
    }
    if torch.device(cost.meta.get("device", "cpu")).type != d.device.type:
        return out
    dtype = DTYPES[cost.meta.get("dtype", "fp32")]
    x = torch.randn(cost.meta.get("batch_size", 1), 3, size, size, device=d.device, dtype=dtype)
    model = copy.deepcopy(exported).to(dtype=dtype).eval()
    out["latency_measured_ms"] = 1e3 * statistics.median(time_forward(model, x, warmup=2, repeats=5))
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Any, batches: int, cfg: TrainConfig, d: Dist) -> None:
    """Re-estimate BatchNorm running statistics over ``batches`` training batches (cumulative average).

    The batches are the first ones of the pseudo-epoch ``cfg.epochs`` (the one training would run next),
    and the forward passes draw from a global RNG seeded for this: the statistics depend on neither the
    state training left the loader in nor the global RNG's, so a resumed run recalibrates exactly as the
    uninterrupted one. The loader's sampler, its generator and the global RNG are left as they were.
    """
    from chase.train.seeds import epoch_seed, recalibration_seed

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    sampler = getattr(loader, "sampler", None)
    position = (sampler.epoch, sampler.start) if hasattr(sampler, "set_epoch") else None
    generator = getattr(loader, "generator", None)
    generator_state = generator.get_state() if generator is not None else None
    devices = [] if d.device.type == "cpu" else [d.device]
    with torch.random.fork_rng(devices=devices, device_type=d.device.type if devices else "cuda"):
        torch.manual_seed(recalibration_seed(cfg.seed))  # the model's own randomness (dropout)
        if position is not None:
            sampler.set_epoch(cfg.epochs, start=0)
        if generator is not None:
            # as the trainer seeds an epoch: the resident loader's crops and flips follow from it
            generator.manual_seed(epoch_seed(cfg.seed, cfg.epochs))
        try:
            for x, _ in itertools.islice(loader, batches):
                x = x.to(d.device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(cfg, d.device):
                    model(x)
        finally:
            if position is not None:
                sampler.set_epoch(*position)
            if generator is not None:
                generator.set_state(generator_state)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    if d.enabled:  # ranks saw different batches: keep rank 0's statistics everywhere
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    model.eval()


@torch.no_grad()
def measure_speedup(
    dense: nn.Module, slim: nn.Module, batch: int, size: int, cfg: TrainConfig, repeats: int = 10
) -> dict[str, float]:
    """Median forward time of both models on a random batch, timed alternately in this process
    (:func:`chase.timing.alternate`), and their ratio."""
    device = next(slim.parameters()).device
    x = torch.randn(batch, 3, size, size, device=device)
    dense, slim = dense.eval(), slim.eval()
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dense, slim = dense.to(memory_format=torch.channels_last), slim.to(memory_format=torch.channels_last)
    times = alternate({"dense": lambda: dense(x), "slim": lambda: slim(x)}, repeats=repeats, device=device)
    dense_s, slim_s = statistics.median(times["dense"]), statistics.median(times["slim"])
    ratios = [a / b for a, b in zip(times["dense"], times["slim"])]
    return {
        "dense_ms": 1e3 * dense_s,
        "slim_ms": 1e3 * slim_s,
        "speedup": dense_s / slim_s,
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models have the same parameter names and shapes (the same architecture)."""
    sa = {n: tuple(p.shape) for n, p in a.named_parameters()}
    return sa == {n: tuple(p.shape) for n, p in b.named_parameters()}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def draw_plots(
    st: TrainState, run_dir: pathlib.Path, before: dict[str, int], after: dict[str, int]
) -> list[str]:
    """The run's PNG figures (when matplotlib is installed): accuracy, widths, and for sparse runs the
    channel-density histogram and the amenable family over training (as ``chase analyze`` draws them).
    Returns the file names written."""
    from chase import plots
    from chase.analysis import amenable_curve, channel_stats

    records = read_metrics(run_dir)
    epochs = [r for r in records if r.get("kind") == "epoch" and "test_acc" in r]
    title = f"{st.cfg.model} ({st.cfg.method})"
    figures: list[tuple[str, Any]] = []
    if epochs:
        figures.append(("accuracy.png", lambda p: plots.plot_accuracy(epochs, p)))
    if after:
        figures.append(("widths.png", lambda p: plots.plot_widths(before, after, p)))
    if st.sparsifier is not None:
        stats = channel_stats(st.module, st.sparsifier)
        figures.append(("channel_density.png", lambda p: plots.plot_channel_densities(stats, p)))
        curve = amenable_curve(records)
        if curve:
            figures.append(("amenable.png", lambda p: plots.plot_amenable_curve(curve, p, title=title)))
    written = []
    for name, draw in figures:
        try:
            draw(run_dir / name)
        except ImportError as e:  # matplotlib is optional
            log.info("no plots: %s", e)
            break
        written.append(name)
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def write_report(
    run_dir: pathlib.Path,
    cfg: TrainConfig,
    results: dict[str, Any],
    before: dict[str, int],
    after: dict[str, int],
    plots: Optional[list[str]] = None,
    options: str = "",
) -> None:
    """``report.md``: results, per-layer widths before/after, and the plots; ``options``: what decided
    the channels (``Sparsifier.describe()``)."""
    lines = [
        f"# {cfg.model} / {cfg.dataset} / {cfg.method}",
        "",
        f"{cfg.epochs} epochs, density {cfg.density}" + (f", {options}" if options else ""),
        "",
        "Test accuracy is the final model's on the test split (no selection on it).",
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in results.items()]
    if "speedup" in results:
        lines += [
            "",
            f"Forward of a batch of {cfg.speedup_batch} at {results.get('slim_ms', 0):.2f} ms (slim) vs "
            f"{results.get('dense_ms', 0):.2f} ms (dense {cfg.model}): **{results['speedup']:.2f}x** "
            f"({results.get('speedup_min', 0):.2f}-{results.get('speedup_max', 0):.2f}x over the repeats), "
            "medians of alternating timings in one process on the training device (eager PyTorch).",
        ]
    elif "speedup_note" in results:
        lines += ["", f"No speedup: {results['speedup_note']}."]
    changed = [n for n in after if before.get(n, after[n]) != after[n]]
    lines += ["", "## Layer widths (output channels)", "", "| layer | before | after |", "|---|---|---|"]
    lines += [f"| {n} | {before.get(n, w)} | {w}{' *' if n in changed else ''} |" for n, w in after.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    (run_dir / REPORT_FILE).write_text("\n".join(lines) + "\n")
