"""CIFAR-10 on a 2-core CPU: dense, SET, RigL, MEST and Chase, under three protocols.

``--protocol short`` (``benchmarks/cifar10_cpu.yaml``): CIFAR ResNet-20, all 50,000 training images, 2
epochs (780 steps of 128); six methods in about an hour: how they compare early in training.
``--protocol long`` (``benchmarks/cifar10_cpu_long.yaml``): the same network and data for 15 epochs (5,850
steps), where every schedule completes (issue 10): dense, RigL and Chase S_c 0.5, with a second seed for
RigL and Chase (``--methods dense rigl chase0.5 rigl@1 chase0.5@1``).
``--protocol vit`` (``benchmarks/vit_cifar10_cpu.yaml``, issue 15): a ViT-Tiny-sized model with patch
size 4 for 2 epochs at density 0.2, AdamW: dense, RigL, Chase S_c 0.3 on MLP neurons, and Chase S_c 0.3
on MLP neurons and attention heads, and on attention heads only (``--methods dense rigl chase0.3
chase0.3heads chase0.3headsonly``).
``--protocol budget`` (the short protocol, issue 14): Chase with prune_skip to a MACs budget of 0.5, channels
ranked by score, by score per MAC saved, by score over the group's mean, the same share of every group, and
a share growing with the group's time per MAC by this CPU's latency table (``--methods dense chase_macs0.5
chase_macs0.5_per_cost chase_macs0.5_normalized chase_macs0.5_uniform chase_macs0.5_latency``).
``--protocol latency`` (the long protocol, issue 26): Chase with prune_skip to a predicted-latency budget of
0.6 by this CPU's CIFAR ResNet-20 latency table, channels ranked by score, by score per millisecond saved
and uniformly (what latency_weighted is under a latency budget), two seeds each (``--methods chase_lat0.6
chase_lat0.6_per_cost chase_lat0.6_uniform chase_lat0.6@1 ...``), and score per millisecond by this
CPU's roofline (``chase_lat0.6_roofline``, and at a budget of 0.5: ``chase_lat0.5_roofline``); RigL's
accuracy is the long protocol's. ``--name`` writes the results under another stem (a second table of the
same protocol).

Every run is ``chase train``'s own code with the protocol YAML + ``configs/methods/<method>.yaml``; the
reported accuracy is the FINAL model's on all 10,000 test images (no selection). For every run the script
records: test accuracy per epoch (and the slim model's, after 20 batches of BatchNorm re-estimation, for
Chase), inference MACs per image -- dense, sparse (kept weights x output positions) and GPU-supported (the
deployable network counted dense) --, training MACs (RigL's accounting from the trainer's cost log), the
amenable-channel family at the start and the end of training (``chase.analysis``: share of sparse conv
channels whose density is below r x their layer's), and wall time. Then it times the deployable networks
(``chase.bench.benchmark``, fp32, batch 1 and 128, alternating in one process) and, for the long
protocol, draws the accuracy, amenable-fraction and width plots next to the tables.

Runs live in ``--runs`` (default ``runs/cifar10_cpu`` or ``runs/cifar10_long``), one folder per method
(``<method>_seed<n>`` for seeds other than 0); a killed script resumes the unfinished run from its
checkpoint and skips finished ones. Results go to ``benchmarks/results/cifar10_cpu[_long].{json,md}``
(rewritten after every run).

    python benchmarks/cifar10_cpu.py --data-dir ../shared/data/cifar10
    python benchmarks/cifar10_cpu.py --protocol long --data-dir ../shared/data/cifar10 \\
        --methods dense rigl chase0.5 rigl@1 chase0.5@1

Smoke test (a minute; never into results/):

    python benchmarks/cifar10_cpu.py --data-dir ../shared/data/cifar10 --smoke --runs /tmp/c10 --out /tmp/c10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time
from typing import Any

import torch

import common
from chase.analysis import amenable_curve, channel_stats
from chase.bench import benchmark
from chase.flops import count_flops
from chase.models import get_model
from chase.train.config import load_config
from chase.train.export import load_run
from chase.train.metrics import read_metrics
from chase.train.run import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
PROTOCOLS = {
    "short": (ROOT / "benchmarks" / "cifar10_cpu.yaml", "cifar10_cpu", "runs/cifar10_cpu"),
    "long": (ROOT / "benchmarks" / "cifar10_cpu_long.yaml", "cifar10_cpu_long", "runs/cifar10_long"),
    "vit": (ROOT / "benchmarks" / "vit_cifar10_cpu.yaml", "vit_cifar10_cpu", "runs/vit_cifar10"),
    "budget": (ROOT / "benchmarks" / "cifar10_cpu.yaml", "cifar10_cpu_budget", "runs/cifar10_budget"),
    "latency": (ROOT / "benchmarks" / "cifar10_cpu_long.yaml", "cifar10_cpu_latency", "runs/cifar10_latency"),
}
METHODS = {
    "dense": "dense",
    "set": "set",
    "rigl": "rigl",
    "mest": "mest",
    "chase0.3": "chase_sc0.3",
    "chase0.5": "chase_sc0.5",
    "chase0.3heads": "chase_sc0.3_heads",
    "chase0.3headsonly": "chase_sc0.3_heads_only",
    "chase_macs0.5": "chase_macs0.5_skip",
    "chase_macs0.5_per_cost": "chase_macs0.5_skip_per_cost",
    "chase_macs0.5_normalized": "chase_macs0.5_skip_normalized",
    "chase_macs0.5_uniform": "chase_macs0.5_skip_uniform",
    "chase_macs0.5_latency": "chase_macs0.5_skip_latency",
    "chase_lat0.6": "chase_lat0.6_skip",
    "chase_lat0.6_per_cost": "chase_lat0.6_skip_per_cost",
    "chase_lat0.6_uniform": "chase_lat0.6_skip_uniform",
    "chase_lat0.6_roofline": "chase_lat0.6_skip_roofline",
    "chase_lat0.5_roofline": "chase_lat0.5_skip_roofline",
    "chase_lat0.5_roofline_score": "chase_lat0.5_skip_roofline_score",
    "chase_lat0.5_roofline_uniform": "chase_lat0.5_skip_roofline_uniform",
    "chase_lat0.5_roofline_m8": "chase_lat0.5_skip_roofline_m8",
    "chase_lat0.5_roofline_tiled": "chase_lat0.5_skip_roofline_tiled",
    "chase_lat0.45_roofline_m8": "chase_lat0.45_skip_roofline_m8",
}
SMOKE = ["epochs=1", "train_limit=1024", "update_every=2", "channel_every=2", "channel_end_epoch=0.8"]
SMOKE += ["bn_recalibrate=2", "speedup_batch=8"]

log = logging.getLogger("cifar10_cpu")


def _final(run_dir: pathlib.Path) -> dict[str, Any] | None:
    return next((r for r in read_metrics(run_dir) if r.get("kind") == "final"), None)


def parse_run(spec: str) -> tuple[str, int]:
    """``"rigl"`` -> ("rigl", 0); ``"rigl@1"`` -> ("rigl", 1)."""
    method, _, seed = spec.partition("@")
    if method not in METHODS or (seed and not seed.isdigit()):
        raise SystemExit(f"bad run {spec!r}: give METHOD or METHOD@SEED, METHOD one of {', '.join(METHODS)}")
    return method, int(seed or 0)


def run_name(method: str, seed: int) -> str:
    return method if seed == 0 else f"{method}_seed{seed}"


def train_method(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; returns its row of the table."""
    protocol = PROTOCOLS[args.protocol][0]
    name = run_name(method, seed)
    run_dir = pathlib.Path(args.runs) / name
    sets = [f"data_dir={args.data_dir}", f"threads={args.threads}", "quiet=true", f"seed={seed}", *args.set]
    if args.smoke:
        sets += SMOKE
    cfg = load_config([protocol, ROOT / "configs" / "methods" / f"{METHODS[method]}.yaml"], sets)
    t0 = time.time()
    final = _final(run_dir)
    if final is None:
        resume = (run_dir / "checkpoint.pt").exists()
        log.info("%s: %s", name, "resuming" if resume else "training")
        train(cfg, run_dir, resume=resume)
        final = _final(run_dir)
        assert final is not None
    else:
        log.info("%s: finished earlier, reusing %s", name, run_dir)
    records = read_metrics(run_dir)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    row: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "run": name,
        "config": [str(protocol.relative_to(ROOT)), f"configs/methods/{METHODS[method]}.yaml"],
        "test_acc": final["test_acc"],
        "train_seconds": sum(r["seconds"] for r in epochs),
        "wall_seconds_this_call": time.time() - t0,
        "steps": final["steps"],
        "epochs": len(epochs),
        "test_acc_per_epoch": [r.get("test_acc") for r in epochs],
        "amenable_curve": {f"{r:g}": pts for r, pts in amenable_curve(records).items()},
        "widths_start": next((r["widths"] for r in records if r.get("kind") == "start"), {}),
        "widths_end": epochs[-1]["widths"] if epochs else {},
    }
    for key in (
        "slim_test_acc",
        "channel_sparsity",
        "params_dense",
        "params_slim",
        "train_macs",
        "train_macs_dense",
        "train_macs_ratio",
        "dense_gradient_steps",
        "density",
    ):
        if key in final:
            row[key] = final[key]
    run = load_run(run_dir)
    example = torch.zeros(1, 3, run.image_size, run.image_size)
    dense = get_model(run.model_name, num_classes=run.num_classes)
    deploy = run.slim() if run.method == "chase" else run.model
    masks = run.sparsifier.masks if run.sparsifier is not None else None
    row["macs_dense"] = count_flops(dense, example).dense
    row["macs_sparse"] = count_flops(run.model, example, masks=masks).sparse
    row["macs_gpu"] = count_flops(deploy, example).dense  # what dense kernels execute
    if run.sparsifier is not None:
        stats = channel_stats(run.model, run.sparsifier)
        row["amenable"] = {f"{r:g}": f for r, f in stats.fractions().items()}
        row["channels"] = stats.counted_channels
    return row


#: the backends each protocol's deployable networks are timed under (chase.deploy).
BACKENDS = {"latency": ("eager", "inductor")}


def measure_throughput(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Forward throughput of the dense network and every Chase slim network (fp32, CPU), deployed under
    the protocol's backends. A protocol without a dense run times an untrained dense network of the same
    architecture (its speed does not depend on its weights)."""
    models: dict[str, torch.nn.Module] = {}
    macs: dict[str, int] = {}
    name = "cifar_resnet20"
    for row in rows:
        if row["seed"] != 0:  # one network per method: seed 0's
            continue
        run = load_run(pathlib.Path(args.runs) / row["run"])
        name = run.model_name
        if row["method"] == "dense" or run.method == "chase":
            models[row["method"]] = run.model if run.method != "chase" else run.slim()
            macs[row["method"]] = row["macs_gpu"]
    if not models:
        return {}
    if "dense" not in models:
        dense = get_model(name, num_classes=10).eval()
        models["dense"] = dense
        macs["dense"] = count_flops(dense, torch.zeros(1, 3, 32, 32)).dense
    order = {"dense": models.pop("dense")} | models  # speedups are over the first model
    batches = [1, 8] if args.smoke else [1, args.batch]
    return benchmark(
        order,
        (3, 32, 32),
        batch_sizes=batches,
        backends=BACKENDS.get(args.protocol, ("eager",)),
        repeats=5 if args.smoke else 20,
        macs=macs,
        device="cpu",
    )


def _amenable_cell(r: dict[str, Any]) -> str:
    curve, end = r.get("amenable_curve") or {}, r.get("amenable")
    if not end:
        return "-"
    start = {k: pts[0][1] for k, pts in curve.items() if pts}
    cells = []
    for k in ("1", "0.5"):
        before = f"{100 * start[k]:.0f} -> " if k in start else ""
        cells.append(f"{before}{100 * end[k]:.0f}%")
    return " / ".join(cells)


def _mean_rows(rows: list[dict[str, Any]]) -> list[str]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    lines = []
    for method, rs in by.items():
        if len(rs) < 2:
            continue
        accs = [100 * r["test_acc"] for r in rs]
        lines.append(
            f"| {method} | {len(rs)} | {sum(accs) / len(accs):.2f}% | {min(accs):.2f} - {max(accs):.2f} |"
        )
    if not lines:
        return []
    return ["", "| method | seeds | mean test acc | min - max |", "|---|---|---|---|", *lines]


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"# CIFAR-10 on a 2-core CPU ({payload['protocol_name']} protocol): "
        f"methods at density {payload.get('density', 0.1)}",
        "",
        f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), torch {m['torch']}, fp32, "
        f"{m['date']}. Protocol: `{payload['protocol']}` -- {payload['protocol_summary']} "
        f"Total training wall time {payload['total_train_minutes']:.1f} min.",
        "",
        "| method | seed | epochs | test acc | slim acc | sparse MACs | GPU-supported MACs | "
        "train MACs (x dense) | amenable < 1x / < 0.5x layer (start -> end) | train min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        dense = r["macs_dense"]
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['epochs']} | {100 * r['test_acc']:.2f}% | "
            + (f"{100 * r['slim_test_acc']:.2f}%" if "slim_test_acc" in r else "-")
            + f" | {r['macs_sparse'] / 1e6:.1f}M ({r['macs_sparse'] / dense:.3f}x) "
            f"| {r['macs_gpu'] / 1e6:.1f}M ({r['macs_gpu'] / dense:.3f}x) | "
            + (f"{r['train_macs_ratio']:.3f}x" if "train_macs_ratio" in r else "1.000x")
            + f" | {_amenable_cell(r)} | {r['train_seconds'] / 60:.1f} |"
        )
    lines += _mean_rows(payload["rows"])
    bench = payload.get("throughput") or {}
    if bench:
        lines += [
            "",
            "Deployable networks (seed 0), forward only, fp32, medians of alternating timings in one "
            "process, each deployed with `chase.deploy` (dense and slim under the same backend; "
            "SET/RigL/MEST deploy the dense architecture: unstructured zeros do not speed up dense "
            "kernels); (min-max): the speedup over the alternating repeats.",
            "",
            "| network | backend | batch | latency ms | images/s | speedup | (min-max) | MACs ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in bench["results"]:
            spread = "{:.2f}-{:.2f}".format(*r["speedup_spread"]) if "speedup_spread" in r else "-"
            lines.append(
                f"| {r['model']} | {r.get('backend', 'eager')} | {r['batch_size']} | {r['latency_ms']:.2f} | "
                f"{r['throughput']:.0f} | {r.get('speedup', 1.0):.2f}x | {spread} | "
                f"{r.get('flops_ratio', 1.0):.2f}x |"
            )
    lines += _timings_table(payload.get("throughput_timings") or [])
    lines += [
        "",
        "Amenable: share of the output channels of the sparse convolutions (not the classifier, not layers "
        "ERK made dense) whose density is below 1x / 0.5x their layer's density, at initialisation -> at "
        "the end (`chase.analysis`; the paper's own Section 3 threshold could not be retrieved, its abstract "
        "says 'sparser than others'). Training MACs: RigL's accounting (3 sparse forwards per step, a dense "
        "weight gradient at gradient-growth updates, soft-bound density and shrinking widths from the "
        "trainer's cost log).",
    ]
    lines += ["", *[f"![{p}]({p})" for p in payload.get("plots", [])]]
    lines.append("")
    return "".join(line + "\n" for line in lines)


def _timings_table(timings: list[dict[str, Any]]) -> list[str]:
    """Each network's speedup over dense in every separate timing (one per column), and their range."""
    if not timings:
        return []
    keys = [(r["model"], r.get("backend", "eager"), r["batch_size"]) for r in timings[0]["results"]]
    lines = [
        "",
        f"The same networks timed {len(timings)} times, one after another (each alternating in itself): "
        "the median speedup of each timing, and their range.",
        "",
        "| network | backend | batch | "
        + " | ".join(f"timing {i + 1}" for i in range(len(timings)))
        + " | range |",
        "|---|---|---|" + "---|" * (len(timings) + 1),
    ]
    for model, backend, batch in keys:
        if model == "dense":
            continue
        got = [
            r["speedup"]
            for t in timings
            for r in t["results"]
            if (r["model"], r.get("backend", "eager"), r["batch_size"]) == (model, backend, batch)
            and "speedup" in r
        ]
        cells = " | ".join(f"{v:.2f}x" for v in got)
        lines.append(f"| {model} | {backend} | {batch} | {cells} | {min(got):.2f}-{max(got):.2f}x |")
    return lines


def plots(payload: dict[str, Any], out: pathlib.Path, stem: str) -> list[str]:
    """Test accuracy per epoch of every run in one figure, the amenable family over training, and the
    per-layer widths of Chase's final network against the dense one. Returns the file names."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return []
    rows, names = payload["rows"], []
    colors = {"dense": "black", "set": "tab:gray", "rigl": "tab:blue", "mest": "tab:purple"}
    colors |= {"chase0.3": "tab:olive", "chase0.5": "tab:red"}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        names.append(name)

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        accs = [a for a in r["test_acc_per_epoch"] if a is not None]
        ax.plot(
            range(1, len(accs) + 1),
            [100 * a for a in accs],
            color=colors.get(r["method"]),
            linestyle="-" if r["seed"] == 0 else "--",
            marker=".",
            label=f"{r['method']} (seed {r['seed']})",
        )
    ax.set(xlabel="epoch", ylabel="test accuracy %", title="CIFAR-10, ResNet-20, final model per epoch")
    ax.legend(fontsize=8)
    save(fig, f"{stem}_accuracy.png")

    sparse = [r for r in rows if r.get("amenable_curve")]
    if sparse:
        fig = Figure(figsize=(7, 4.2))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for r in sparse:
            for k, style in (("1", "-"), ("0.5", ":")):
                pts = r["amenable_curve"].get(k, [])
                ax.plot(
                    [p[0] for p in pts],
                    [100 * p[1] for p in pts],
                    style,
                    color=colors.get(r["method"]),
                    alpha=1.0 if r["seed"] == 0 else 0.5,
                    label=f"{r['method']} s{r['seed']}: < {k}x layer",
                )
        ax.set(
            xlabel="optimizer step",
            ylabel="% of sparse conv channels",
            title="channels sparser than their layer (solid: < 1x, dotted: < 0.5x)",
        )
        ax.legend(fontsize=7, ncol=2)
        save(fig, f"{stem}_amenable.png")

    chase_rows = [r for r in rows if r["method"].startswith("chase") and r["seed"] == 0 and r["widths_end"]]
    if chase_rows:
        r = chase_rows[-1]
        layers = [n for n in r["widths_start"] if n in r["widths_end"]]
        fig = Figure(figsize=(max(7, 0.3 * len(layers)), 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.bar(range(len(layers)), [r["widths_start"][n] for n in layers], color="lightgray", label="dense")
        ax.bar(
            range(len(layers)),
            [r["widths_end"][n] for n in layers],
            color=colors.get(r["method"]),
            label=f"{r['method']} final",
        )
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([n.replace(".weight", "") for n in layers], rotation=90, fontsize=7)
        ax.set(ylabel="output channels", title="layer widths: dense vs Chase's final network")
        ax.legend()
        save(fig, f"{stem}_widths.png")
    speed = _accuracy_vs_speed(payload, out, f"{stem}_speed.png")
    if speed:
        names.append(speed)
    return names


def _accuracy_vs_speed(payload: dict[str, Any], out: pathlib.Path, name: str) -> str:
    """Mean test accuracy over seeds (min-max bars) against the deployable network's measured speedup
    over dense (largest batch, every backend timed), with RigL's and dense's accuracy of the long protocol
    as references. Returns the file name ('' when there is nothing to draw)."""
    bench = payload.get("throughput") or {}
    rows = [r for r in bench.get("results", []) if "speedup" in r]
    if not rows:
        return ""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    batch = max(r["batch_size"] for r in rows)
    accs: dict[str, list[float]] = {}
    for r in payload["rows"]:
        accs.setdefault(r["method"], []).append(100 * r["test_acc"])
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    markers = {"eager": "o", "inductor": "s", "onnxruntime": "^", "openvino": "D"}
    for r in rows:
        if r["batch_size"] != batch or r["model"] not in accs:
            continue
        a = accs[r["model"]]
        mean = sum(a) / len(a)
        ax.errorbar(
            r["speedup"], mean, yerr=[[mean - min(a)], [max(a) - mean]], fmt=markers.get(r["backend"], "o"),
            label=f"{r['model']} ({r['backend']})", capsize=3,
        )  # fmt: skip
    long = RESULTS_DIR / "cifar10_cpu_long.json"
    if long.is_file():
        ref: dict[str, list[float]] = {}
        for r in json.loads(long.read_text())["rows"]:
            ref.setdefault(r["method"], []).append(100 * r["test_acc"])
        for method, style in (("rigl", "--"), ("dense", ":")):
            if method in ref:
                v = sum(ref[method]) / len(ref[method])
                ax.axhline(v, linestyle=style, color="gray", label=f"{method} (long protocol) {v:.2f}%")
    ax.set(
        xlabel=f"measured speedup over dense, batch {batch} (deployed, same backend)",
        ylabel="test accuracy % (mean of seeds, min-max)",
        title="CIFAR-10 ResNet-20: accuracy against deployable speed (this CPU)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10: ImageFolder copy or torchvision cache")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="short")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD[@SEED]",
        help=f"runs, from {', '.join(METHODS)}; @SEED for a seed other than 0 (default: all methods)",
    )
    p.add_argument("--runs", default=None, help="folder of the run folders (default per protocol)")
    p.add_argument("--out", default=str(common.RESULTS), help="folder of the result files")
    p.add_argument("--name", default=None, help="stem of the result files (default per protocol)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="the larger batch size of the speed comparison")
    p.add_argument("--timings", type=int, default=1, help="separate timings of the networks (ranges)")
    p.add_argument("--smoke", action="store_true", help="1 epoch, tiny schedules: checks the script only")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    protocol, stem, runs = PROTOCOLS[args.protocol]
    stem = args.name or stem
    args.runs = args.runs or str(ROOT / runs)
    runs_wanted = [parse_run(m) for m in (args.methods or list(METHODS))]
    base = load_config([protocol], [f"data_dir={args.data_dir}", *args.set, *(SMOKE if args.smoke else [])])
    payload: dict[str, Any] = {
        "protocol": str(protocol.relative_to(ROOT)) + (" (smoke overrides)" if args.smoke else ""),
        "protocol_name": args.protocol,
        "protocol_summary": (
            f"{base.model}, {'a subset of the' if base.train_limit else 'all 50,000'} training images, "
            f"{base.epochs} epochs of batch {base.batch_size}, "
            f"{base.optimizer.upper()} + {base.schedule} LR, "
            f"density {base.density} ({base.distribution.upper()}), "
            f"mask updates every {base.update_every} steps "
            "(RigL/SET/MEST until 75% of the steps, Chase to the end), Chase channel events every "
            f"{base.channel_every} steps until 80%; final model on the 10,000 test images."
        ),
        "density": base.density,
        "overrides": args.set + (SMOKE if args.smoke else []),
        "machine": common.machine("cpu"),
        "load_average_start": os.getloadavg(),
        "rows": [],
    }
    out = pathlib.Path(args.out)
    for method, seed in runs_wanted:
        payload["rows"].append(train_method(method, seed, args))
        payload["total_train_minutes"] = sum(r["train_seconds"] for r in payload["rows"]) / 60
        payload["load_average_end"] = os.getloadavg()
        common.write(stem, payload, markdown(payload), folder=out)
        log.info("%s", json.dumps({k: v for k, v in payload["rows"][-1].items() if k in ("run", "test_acc")}))
    # This VM's speed drifts by up to 2x between minutes: several timings, each alternating in itself,
    # give the range a reader should expect; the first one is the table.
    timings = [measure_throughput(payload["rows"], args) for _ in range(args.timings)]
    payload["throughput"] = timings[0]
    if len(timings) > 1:
        payload["throughput_timings"] = timings
    payload["load_average_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    payload["plots"] = plots(payload, out, stem)
    common.write(stem, payload, markdown(payload), folder=out)
    print(markdown(payload))


if __name__ == "__main__":
    main()
