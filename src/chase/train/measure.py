"""Bodies of the measurement commands ``chase flops``, ``chase bench`` and ``chase analyze``.

A command measures either a model name (freshly built, untrained) or a training run: a run folder or
its ``checkpoint.pt`` is rebuilt the way ``chase export`` does it (config -> model -> sparsifier -> state).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from chase.flops import FlopReport, count_flops

log = logging.getLogger(__name__)

__all__ = [
    "LoadedRun",
    "analyze_command",
    "bench_command",
    "flops_command",
    "load_run",
    "untrained_label",
    "untrained_slim",
]


class CommandError(ValueError):
    """A user error: printed without a traceback, exit status 2."""


@dataclass
class LoadedRun:
    """A training checkpoint rebuilt: ``model`` is the trained model (already narrowed when Chase removed
    channels physically), ``sparsifier`` None for dense runs."""

    path: pathlib.Path
    model_name: str
    method: str
    num_classes: int
    image_size: int
    model: nn.Module
    sparsifier: Any

    @property
    def folder(self) -> pathlib.Path:
        return self.path.parent

    def slim(self) -> Optional[nn.Module]:
        """The exported slim model (Chase), or None (other methods keep every channel)."""
        return self.sparsifier.export().eval() if hasattr(self.sparsifier, "export") else None


def load_run(path: str | pathlib.Path) -> LoadedRun:
    """Rebuild model and sparsifier of a run folder or ``checkpoint.pt`` (the ``chase export`` path)."""
    from chase.train.export import rebuild

    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise CommandError(f"{p} does not exist (give a run folder or its checkpoint.pt)")
    cfg, meta, model, sp = rebuild(p)
    model.eval()
    return LoadedRun(p, cfg.model, cfg.method, meta["num_classes"], meta["image_size"], model, sp)


#: density at which an untrained width is chosen: the paper's d (what Chase sees at its first event).
INIT_DENSITY = 0.1


def untrained_slim(
    model: nn.Module,
    example: torch.Tensor,
    channel_sparsity: float,
    prune_skip: bool = False,
    density: float = INIT_DENSITY,
) -> nn.Module:
    """A copy of ``model`` narrowed at once to Chase's final width for ``channel_sparsity``. The channels are
    chosen as Chase would at its first event: by UMM of the current (e.g. random) weights masked at
    ``density`` (ERK, Chase's seed 0), not of the dense weights; the copy keeps those masked weights.
    For timing and FLOPs only: it is not a trained model."""
    import copy

    from chase.sparsifier import Chase

    work = copy.deepcopy(model)
    opt = torch.optim.SGD(work.parameters(), lr=0.0)
    with warnings.catch_warnings():  # a 6-step schedule warns; we run its last event by hand
        warnings.simplefilter("ignore")
        sp = Chase(
            work,
            opt,
            density=density,
            soft_bound=0.0,
            total_steps=6,
            example_inputs=example,
            channel_sparsity=channel_sparsity,
            prune_skip=prune_skip,
            update_every=2,
            channel_every=1,
            channel_end=2,
        )
        sp.remove_channels_now(sp.last_event)  # the schedule's end: the full channel_sparsity
    return sp.export().eval()


def untrained_label(channel_sparsity: float, prune_skip: bool, density: float = INIT_DENSITY) -> str:
    """What an :func:`untrained_slim` model is, for every table that reports one."""
    return (
        f"UNTRAINED width: Chase channel_sparsity={channel_sparsity} prune_skip={prune_skip}, all removed at "
        f"once, channels ranked by UMM of the initial weights masked at density {density} (ERK)"
    )


def _example(run: Optional[LoadedRun], args: argparse.Namespace) -> torch.Tensor:
    size = args.input or (run.image_size if run else 224)
    return torch.zeros(1, 3, size, size)


def _models(args: argparse.Namespace) -> tuple[nn.Module, Optional[nn.Module], Optional[LoadedRun], str]:
    """(dense reference, slim model or None, the run if any, a label saying what "slim" is)."""
    from chase.models import get_model

    source = getattr(args, "source", None) or getattr(args, "slim_from", None)
    if source and getattr(args, "channel_sparsity", None) is not None:
        raise CommandError("give a checkpoint or --channel-sparsity, not both")
    if source:
        run = load_run(source)
        if args.model and args.model != run.model_name:
            raise CommandError(f"--model {args.model} but the checkpoint trained {run.model_name}")
        dense = get_model(run.model_name, num_classes=run.num_classes).eval()
        slim = run.slim()
        what = f"exported model of {run.path} ({run.method})" if slim is not None else ""
        return dense, slim, run, what
    if not args.model:
        raise CommandError("give a model name (--model) or a run folder / checkpoint")
    dense = get_model(args.model, num_classes=args.num_classes).eval()
    if getattr(args, "channel_sparsity", None) is None:
        return dense, None, None, ""
    s, skip = args.channel_sparsity, args.prune_skip
    d = INIT_DENSITY if getattr(args, "density", None) is None else args.density
    try:
        slim = untrained_slim(dense, _example(None, args), s, skip, density=d)
    except ValueError as e:  # an option out of range (density, channel sparsity): the user's to fix
        raise CommandError(str(e)) from e
    return dense, slim, None, untrained_label(s, skip, d)


def _write_json(obj: Any, path: str | pathlib.Path) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


def flops_command(args: argparse.Namespace) -> int:
    """``chase flops``: dense, sparse and GPU-supported (slim) MACs per image, with ratios."""
    dense, slim, run, what = _models(args)
    x = _example(run, args)
    ref = count_flops(dense, x)
    rows: list[tuple[str, int]] = [("dense", ref.dense)]
    sparse: FlopReport = ref
    if run is not None and run.sparsifier is not None:
        sparse = count_flops(run.model, x, run.sparsifier.masks)
        rows.append(("sparse (kept weights)", sparse.sparse))
    slim_report = count_flops(slim, x) if slim is not None else None
    if slim_report is not None:
        rows.append(("GPU-supported (slim)", slim_report.dense))
    elif run is not None and run.sparsifier is not None:  # unstructured sparsity: every channel is kept
        rows.append(("GPU-supported (dense)", ref.dense))
    name = run.model_name if run else args.model
    print(f"{name}, input {tuple(x.shape[1:])}, MACs per image" + (f"; slim = {what}" if what else ""))
    print(f"{'count':<24} {'GMACs':>10} {'ratio':>8}")
    for label, v in rows:
        print(f"{label:<24} {v / 1e9:>10.4f} {v / ref.dense:>7.3f}x")
    if args.layers:  # the trained model's kept weights when there are masks, else the widths measured
        print((sparse if sparse is not ref else slim_report or ref).table())
    if args.json:
        _write_json(
            {
                "model": name,
                "input": list(x.shape[1:]),
                "slim": what or None,
                "method": run.method if run else None,
                "dense": ref.dense,
                "sparse": sparse.sparse,
                "gpu_supported": slim_report.dense if slim_report else ref.dense,
                "sparse_ratio": sparse.sparse / ref.dense,
                "gpu_supported_ratio": (slim_report.dense if slim_report else ref.dense) / ref.dense,
                "layers": sparse.as_dict()["layers"],
                "slim_layers": slim_report.as_dict()["layers"] if slim_report else None,
            },
            args.json,
        )
    return 0


def bench_command(args: argparse.Namespace) -> int:
    """``chase bench``: throughput and latency of dense vs slim, table and JSON."""
    from chase.bench import DTYPES, benchmark, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda but CUDA is not available")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise CommandError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    if args.batch_sizes:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    else:  # a full sweep to 256 takes minutes per model on a small CPU
        batches = [1, 8, 32, 64, 128, 256] if device.startswith("cuda") else [1, 8, 32]
    dense, slim, run, what = _models(args)
    x = _example(run, args)
    models = {"dense": dense} if slim is None else {"dense": dense, "slim": slim}
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    if slim is None:
        log.warning("no slim model (give a Chase checkpoint or --channel-sparsity): timing dense only")
    onnx: Optional[dict[str, pathlib.Path]] = None
    checks: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chase-onnx-") as tmp:  # the files live as long as the timing
        if args.onnx:
            onnx, checks, failed = _onnx_files(models, x, device, dtypes, pathlib.Path(tmp))
        result = benchmark(
            models,
            tuple(x.shape[1:]),
            batch_sizes=batches,
            dtypes=dtypes,
            device=device,
            channels_last={"off": [False], "on": [True], "both": [False, True]}[args.channels_last],
            compiled=[False, True] if args.compile else [False],
            warmup=args.warmup,
            repeats=args.repeats,
            macs=macs,
            meta={"model": run.model_name if run else args.model, "slim": what or None},
            onnx=onnx,
        )
    if args.onnx:
        result["meta"]["onnx_check"] = checks
        result["skipped"] += failed
    print(format_table(result))
    for label, c in checks.items():
        print(
            f"onnxruntime check of {label}: max |onnxruntime - torch| {c['max_abs_diff']:.3g} "
            f"(largest |output| {c['max_abs_output']:.3g}) at batch sizes {c['batch_sizes']}"
        )
    out = args.json or (run.folder / "bench.json" if run else None)
    if out:
        _write_json(result, out)
    return 0


def _onnx_files(
    models: dict[str, nn.Module], x: torch.Tensor, device: str, dtypes: list[str], folder: pathlib.Path
) -> tuple[dict[str, pathlib.Path], dict[str, Any], list[dict[str, Any]]]:
    """Export every model to ONNX in ``folder`` and check it with onnxruntime, when some configuration
    will time it (fp32 on the CPU). Returns ({label: file}, {label: check result}, skip notes of models
    that failed to export or to match PyTorch: those are not timed, never timed wrong)."""
    from chase.onnx import check_onnx, export_onnx

    if torch.device(device).type != "cpu" or "fp32" not in dtypes:
        return {}, {}, []  # benchmark() records why for each configuration
    files, checks, failed = {}, {}, []
    example = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    for label, model in models.items():
        path = folder / f"{label}.onnx"
        try:
            export_onnx(model, example, path)
            checks[label] = check_onnx(path, model, example)
            del checks[label]["path"]  # a temporary file
        except ModuleNotFoundError as e:
            raise CommandError(str(e)) from e
        except Exception as e:  # an export or check failure: record it, time the rest
            reason = f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            failed.append(
                {
                    "dtype": "fp32",
                    "channels_last": False,
                    "compiled": False,
                    "backend": "onnxruntime",
                    "reason": reason,
                }
            )
            log.warning("onnxruntime rows of %s", reason)
            continue
        files[label] = path
        log.info("ONNX %s: max |onnxruntime - torch| %.3g", label, checks[label]["max_abs_diff"])
    return files, checks, failed


def analyze_command(args: argparse.Namespace) -> int:
    """``chase analyze``: per-layer channel densities of a sparse run, printed and plotted."""
    from chase.analysis import amenable_curve, channel_stats
    from chase.train.report import read_metrics

    run = load_run(args.source)
    if run.sparsifier is None:
        raise CommandError(f"{run.path} is a dense run: it has no masks to analyse")
    stats = channel_stats(run.model, run.sparsifier, amenable_ratio=args.amenable_ratio)
    print(f"{run.model_name} ({run.method}), {run.path}")
    print(stats.summary())
    out = pathlib.Path(args.out) if args.out else run.folder / "channel_density.png"
    if out.suffix.lower() != ".png":
        out = out / "channel_density.png"
    plot_channel_densities(stats, out, title=f"{run.model_name} ({run.method})")
    print(f"wrote {out}")
    curve = amenable_curve(read_metrics(run.folder))
    if curve:
        print(
            "amenable family over training (share of sparse conv channels below r x their layer's density):"
        )
        for r, points in curve.items():
            print(
                f"  r={r:g}: {100 * points[0][1]:.1f}% at step {points[0][0]} -> "
                f"{100 * points[-1][1]:.1f}% at step {points[-1][0]} ({len(points)} records)"
            )
        path = out.with_name("amenable.png")
        plot_amenable_curve(curve, path, title=f"{run.model_name} ({run.method})")
        print(f"wrote {path}")
    return 0


def plot_amenable_curve(
    curve: dict[float, list[tuple[int, float]]], path: pathlib.Path, title: str = ""
) -> None:
    """The amenable family over training steps, one line per ratio (see ``chase.analysis``)."""
    Figure, FigureCanvasAgg = _matplotlib()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r, points in sorted(curve.items(), reverse=True):
        ax.plot(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            marker=".",
            label=f"density < {r:g} x layer's",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("% of sparse conv channels")
    ax.set_title(title or "sparse amenable channels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's Figure and Agg canvas (no pyplot: no global figure state, no display backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise CommandError("chase analyze needs matplotlib for its plots (pip install matplotlib)") from e
    return Figure, FigureCanvasAgg


def plot_channel_densities(stats: Any, path: pathlib.Path, title: str = "") -> None:
    """Histogram of all channel densities, and per-layer box plots with each layer's density marked."""
    Figure, FigureCanvasAgg = _matplotlib()
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = [s for s in stats.layers if s.density.numel()]
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)  # no pyplot: no global figure state, no display backend needed
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    if layers:
        everything = torch.cat([s.density for s in layers]).numpy()
        ax1.hist(everything, bins=40, color="tab:blue")
        ax2.boxplot([s.density.numpy() for s in layers], showfliers=True)
        ax2.plot(
            range(1, len(layers) + 1), [s.layer_density for s in layers], "D", ms=4, label="layer density"
        )
        ax2.legend(loc="upper right")
    ax1.set_xlabel("channel density (kept / original filter size)")
    ax1.set_ylabel("channels")
    ax1.set_title(f"all channels: {100 * stats.amenable_fraction:.1f}% sparse amenable")
    ax2.set_xlabel("sparse layer (in model order)")
    ax2.set_ylabel("channel density")
    ax2.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
