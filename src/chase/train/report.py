"""The end of a run: the exported model, its test accuracy, a measured speedup, and ``report.md``."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pathlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from chase.flops import StepCost, count_flops, training_flops
from chase.models import get_model
from chase.train.checkpoint import atomic_save
from chase.train.config import TrainConfig
from chase.train.data import Data
from chase.train.distributed import Dist
from chase.train.loop import TrainState, autocast, evaluate

log = logging.getLogger(__name__)

__all__ = ["finish", "measure_speedup", "read_metrics", "recalibrate_bn", "training_cost"]

SLIM_FILE, FINAL_FILE, REPORT_FILE = "slim.pt", "final.pt", "report.md"


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Any, batches: int, cfg: TrainConfig, d: Dist) -> None:
    """Re-estimate BatchNorm running statistics over ``batches`` training batches (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    for x, _ in itertools.islice(loader, batches):
        x = x.to(d.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, d.device):
            model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    if d.enabled:  # ranks saw different batches: keep rank 0's statistics everywhere
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    model.eval()


@torch.no_grad()
@torch.no_grad()
def measure_speedup(
    dense: nn.Module, slim: nn.Module, x: torch.Tensor, repeats: int = 10
) -> dict[str, float]:
    """Median forward time of both models on batch ``x``, timed alternately in this process (after a
    warm-up; CUDA synchronised), and their ratio."""
    dense.eval()
    slim.eval()
    times: dict[str, list[float]] = {"dense": [], "slim": []}

    def once(m: nn.Module) -> float:
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        m(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up: allocator, kernel selection
        once(dense), once(slim)
    for _ in range(repeats):
        times["dense"].append(once(dense))
        times["slim"].append(once(slim))
    dense_s, slim_s = statistics.median(times["dense"]), statistics.median(times["slim"])
    return {"dense_ms": 1e3 * dense_s, "slim_ms": 1e3 * slim_s, "speedup": dense_s / slim_s}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def finish(
    st: TrainState, data: Data, test: dict[str, float], run_dir: pathlib.Path, initial: dict[str, Any]
) -> dict[str, Any]:
    """Export, evaluate and time the final model; rank 0 writes the model file and ``report.md``."""
    cfg, sp, d = st.cfg, st.sparsifier, st.dist
    size, classes = data.image_size, data.num_classes
    results: dict[str, Any] = {
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "steps": st.step,
        "density": sp.global_density() if sp is not None else 1.0,
    }
    meta = {"model": cfg.model, "num_classes": classes, "image_size": size, "method": cfg.method}
    example = torch.zeros(1, 3, size, size, device=d.device)
    dense_ref = get_model(cfg.model, num_classes=classes).to(d.device)
    results["params_dense"] = _params(dense_ref)
    results["macs_dense"] = count_flops(dense_ref, example).dense
    if hasattr(sp, "export"):
        results["channel_sparsity"] = sp.channel_sparsity_now()
        slim = sp.export().to(d.device)
        recalibrate_bn(slim, data.train, cfg.bn_recalibrate, cfg, d)
        slim_test = evaluate(slim, data.test, cfg, d)
        results.update(
            slim_test_acc=slim_test["acc"],
            slim_test_loss=slim_test["loss"],
            params_slim=_params(slim),
            macs_slim=count_flops(slim, example).dense,
            macs_sparse=count_flops(slim, example, masks=sp.masks).sparse,
        )
        results["macs_ratio"] = results["macs_slim"] / results["macs_dense"]
        if d.main:
            ckpt = sp.slim_checkpoint()
            ckpt["model"] = {k: v.detach().cpu() for k, v in slim.state_dict().items()}
            ckpt["meta"] = meta
            atomic_save(ckpt, run_dir / SLIM_FILE)
            if cfg.speedup_batch > 0:
                x = torch.randn(cfg.speedup_batch, 3, size, size, device=d.device)
                if cfg.channels_last:
                    x, slim, dense_ref = (
                        x.contiguous(memory_format=torch.channels_last),
                        slim.to(memory_format=torch.channels_last),
                        dense_ref.to(memory_format=torch.channels_last),
                    )
                results.update(measure_speedup(dense_ref, slim, x))
        results["model_file"] = SLIM_FILE
    else:
        if d.main:
            atomic_save(
                {
                    "format_version": 1,
                    "meta": meta,
                    "model": st.module.state_dict(),
                    "masks": sp.masks if sp is not None else {},
                },
                run_dir / FINAL_FILE,
            )
        results["model_file"] = FINAL_FILE
    if sp is not None:
        from chase.analysis import amenable_record

        results.update(amenable_record(sp))  # the amenable family of the final masks
    if d.main and sp is not None:
        _density_plot(st, run_dir)
    if d.main:
        results.update(training_cost(read_metrics(run_dir), st.step, cfg.batch_size * d.world))
    if d.main:
        widths = {n: int(p.shape[0]) for n, p in st.module.named_parameters() if p.ndim > 1}
        write_report(run_dir, cfg, results, initial.get("widths", {}), widths)
        log.info("report written to %s", run_dir / REPORT_FILE)
    return results


def training_cost(records: Sequence[dict[str, Any]], steps: int, batch_size: int) -> dict[str, float]:
    """Training MACs of a run from its metrics: RigL's accounting (``chase.training_flops``) over the
    per-step forward cost that the ``start`` and ``cost`` records describe (density, widths, and which
    steps computed a dense gradient). Returns ``{}`` when the run has no ``start`` record."""
    start = next((r for r in records if r.get("kind") == "start"), None)
    if start is None or not start.get("macs"):
        return {}
    changes = {r["step"]: r for r in records if r.get("kind") == "cost"}

    def log() -> Iterator[StepCost]:
        now = start
        for t in range(1, steps + 1):
            rec = changes.get(t)
            # Step t ran with the state before its own update; the update's cost is its dense gradient.
            yield StepCost(now["macs_sparse"] / now["macs"], now["macs"], bool(rec and rec["update"]))
            now = rec or now

    total = training_flops(log(), update_every=None, batch_size=batch_size)
    return {
        "train_macs": round(total.total),
        "train_macs_dense": round(total.dense_total),
        "train_macs_ratio": total.ratio,
        "dense_gradient_steps": total.update_steps,
    }


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run folder's ``metrics.jsonl`` (empty when it has none)."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


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
) -> None:
    """``report.md``: results, per-layer widths before/after, and plots when matplotlib is installed."""
    lines = [
        f"# {cfg.model} / {cfg.dataset} / {cfg.method}",
        "",
        f"{cfg.epochs} epochs, density {cfg.density}"
        + (
            f", channel sparsity {cfg.channel_sparsity}, prune_skip={cfg.prune_skip}"
            if cfg.method == "chase"
            else ""
        ),
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
            f"{results.get('dense_ms', 0):.2f} ms (dense {cfg.model}): **{results['speedup']:.2f}x**, "
            "medians of alternating timings in one process on the training device.",
        ]
    changed = [n for n in after if before.get(n, after[n]) != after[n]]
    lines += ["", "## Layer widths (output channels)", "", "| layer | before | after |", "|---|---|---|"]
    lines += [f"| {n} | {before.get(n, w)} | {w}{' *' if n in changed else ''} |" for n, w in after.items()]
    plots = _plots(run_dir, before, after)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    (run_dir / REPORT_FILE).write_text("\n".join(lines) + "\n")


def _plots(run_dir: pathlib.Path, before: dict[str, int], after: dict[str, int]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    records = read_metrics(run_dir)
    epochs = [r for r in records if r.get("kind") == "epoch" and "test_acc" in r]
    out = []
    if epochs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["epoch"] for r in epochs], [r["test_acc"] for r in epochs], label="test")
        ax.plot([r["epoch"] for r in epochs], [r["train_acc"] for r in epochs], label="train")
        ax.set(xlabel="epoch", ylabel="accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy.png", dpi=100)
        plt.close(fig)
        out.append("accuracy.png")
    if after:
        fig, ax = plt.subplots(figsize=(max(6, 0.15 * len(after)), 3.5))
        idx = range(len(after))
        ax.bar(idx, [before.get(n, w) for n, w in after.items()], color="lightgray", label="before")
        ax.bar(idx, list(after.values()), label="after")
        ax.set(xlabel="layer", ylabel="output channels")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "widths.png", dpi=100)
        plt.close(fig)
        out.append("widths.png")
    # drawn before the report by _density_plot (sparse runs only)
    out += [name for name in ("channel_density.png", "amenable.png") if (run_dir / name).exists()]
    return out


def _density_plot(st: TrainState, run_dir: pathlib.Path) -> None:
    """The per-channel density histogram of the final model and the amenable family over training (as
    ``chase analyze`` draws them)."""
    from chase.analysis import amenable_curve, channel_stats
    from chase.train.measure import CommandError, plot_amenable_curve, plot_channel_densities

    try:
        plot_channel_densities(channel_stats(st.module, st.sparsifier), run_dir / "channel_density.png")
        curve = amenable_curve(read_metrics(run_dir))
        if curve:
            plot_amenable_curve(curve, run_dir / "amenable.png", title=f"{st.cfg.model} ({st.cfg.method})")
    except CommandError as e:  # matplotlib is optional
        log.info("no channel-density plot: %s", e)
