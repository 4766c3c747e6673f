"""CIFAR-10 on a 2-core CPU: dense, SET, RigL, MEST, Chase S_c 0.3 and Chase S_c 0.5 at density 0.1.

Protocol (``benchmarks/cifar10_cpu.yaml`` + ``configs/methods/<method>.yaml``, run by ``chase train``'s
own code): CIFAR ResNet-20, all 50,000 training images, 2 epochs (780 steps of 128), SGD with cosine LR,
ERK density 0.1; the reported accuracy is the FINAL model's on all 10,000 test images (no selection). For
every method the script records: test accuracy (and the slim model's, after 20 batches of BatchNorm
re-estimation, for Chase), inference MACs per image -- dense, sparse (kept weights x output positions)
and GPU-supported (the deployable network counted dense: the slim one for Chase, the full one otherwise)
--, training MACs (RigL's accounting from the trainer's cost log), the fraction of sparse amenable
channels (``chase.channel_stats``: channel density < 0.5 x its layer's), and wall time. Then it times
the deployable networks (``chase.bench.benchmark``, fp32, batch 1 and 128, alternating in one process).

Runs live in ``--runs`` (default ``runs/cifar10_cpu``); a killed script resumes the unfinished run from
its checkpoint and skips finished ones, so the whole comparison can be continued. Results go to
``benchmarks/results/cifar10_cpu.{json,md}`` (rewritten after every method).

    python benchmarks/cifar10_cpu.py --data-dir ../shared/data/cifar10

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
from chase.analysis import channel_stats
from chase.bench import benchmark
from chase.flops import count_flops
from chase.models import get_model
from chase.train.config import load_config
from chase.train.measure import load_run
from chase.train.report import read_metrics
from chase.train.run import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "benchmarks" / "cifar10_cpu.yaml"
METHODS = {
    "dense": "dense",
    "set": "set",
    "rigl": "rigl",
    "mest": "mest",
    "chase0.3": "chase_sc0.3",
    "chase0.5": "chase_sc0.5",
}
SMOKE = [
    "epochs=1",
    "train_limit=1024",
    "update_every=4",
    "channel_every=4",
    "update_end_epoch=0.75",
    "soft_bound_end_epoch=0.75",
]
SMOKE += ["channel_end_epoch=0.8", "bn_recalibrate=2", "speedup_batch=8"]

log = logging.getLogger("cifar10_cpu")


def _final(run_dir: pathlib.Path) -> dict[str, Any] | None:
    return next((r for r in read_metrics(run_dir) if r.get("kind") == "final"), None)


def train_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume, or reuse) one method's run; returns its row of the table."""
    run_dir = pathlib.Path(args.runs) / method
    sets = [f"data_dir={args.data_dir}", f"threads={args.threads}", "quiet=true", *args.set]
    if args.smoke:
        sets += SMOKE
    cfg = load_config([PROTOCOL, ROOT / "configs" / "methods" / f"{METHODS[method]}.yaml"], sets)
    t0 = time.time()
    final = _final(run_dir)
    if final is None:
        resume = (run_dir / "checkpoint.pt").exists()
        log.info("%s: %s", method, "resuming" if resume else "training")
        train(cfg, run_dir, resume=resume)
        final = _final(run_dir)
        assert final is not None
    else:
        log.info("%s: finished earlier, reusing %s", method, run_dir)
    epochs = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
    row: dict[str, Any] = {
        "method": method,
        "config": [str(PROTOCOL.relative_to(ROOT)), f"configs/methods/{METHODS[method]}.yaml"],
        "test_acc": final["test_acc"],
        "train_seconds": sum(r["seconds"] for r in epochs),
        "wall_seconds_this_call": time.time() - t0,
        "steps": final["steps"],
        "epochs": len(epochs),
        "test_acc_per_epoch": [r.get("test_acc") for r in epochs],
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
        row["amenable_fraction"] = stats.amenable_fraction
        row["channels"] = stats.channels
    return row


def measure_throughput(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Forward throughput of the dense network and every Chase slim network (fp32, CPU)."""
    models: dict[str, torch.nn.Module] = {}
    macs: dict[str, int] = {}
    for row in rows:
        run = load_run(pathlib.Path(args.runs) / row["method"])
        if row["method"] == "dense" or run.method == "chase":
            models[row["method"]] = run.model if run.method != "chase" else run.slim()
            macs[row["method"]] = row["macs_gpu"]
    if "dense" not in models:
        return {}
    order = {"dense": models.pop("dense")} | models  # speedups are over the first model
    batches = [1, 8] if args.smoke else [1, 128]
    return benchmark(
        order, (3, 32, 32), batch_sizes=batches, repeats=5 if args.smoke else 20, macs=macs, device="cpu"
    )


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        "# CIFAR-10 on a 2-core CPU: dense, SET, RigL, MEST and Chase at density 0.1",
        "",
        f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), torch {m['torch']}, fp32, "
        f"{m['date']}. Protocol: `{payload['protocol']}` -- {payload['protocol_summary']} "
        f"Total training wall time {payload['total_train_minutes']:.1f} min.",
        "",
        "| method | test acc | slim acc | sparse MACs | GPU-supported MACs | train MACs (x dense) | "
        "amenable channels | train min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        dense = r["macs_dense"]
        lines.append(
            f"| {r['method']} | {100 * r['test_acc']:.2f}% | "
            + (f"{100 * r['slim_test_acc']:.2f}%" if "slim_test_acc" in r else "-")
            + f" | {r['macs_sparse'] / 1e6:.1f}M ({r['macs_sparse'] / dense:.3f}x) "
            f"| {r['macs_gpu'] / 1e6:.1f}M ({r['macs_gpu'] / dense:.3f}x) | "
            + (f"{r['train_macs_ratio']:.3f}x" if "train_macs_ratio" in r else "1.000x")
            + " | "
            + (f"{100 * r['amenable_fraction']:.1f}% of {r['channels']}" if "amenable_fraction" in r else "-")
            + f" | {r['train_seconds'] / 60:.1f} |"
        )
    bench = payload.get("throughput") or {}
    if bench:
        lines += [
            "",
            "Deployable networks, forward only, fp32, medians of alternating timings in one process "
            "(SET/RigL/MEST deploy the dense architecture: unstructured zeros do not speed up dense "
            "kernels).",
            "",
            "| network | batch | latency ms | images/s | speedup | MACs ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in bench["results"]:
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['latency_ms']:.2f} | {r['throughput']:.0f} | "
                f"{r.get('speedup', 1.0):.2f}x | {r.get('flops_ratio', 1.0):.2f}x |"
            )
    lines += [
        "",
        "Sparse amenable channel: channel density < 0.5 x its layer's density (our operational definition). "
        "Training MACs: RigL's accounting (3 sparse forwards per step, a dense weight gradient at "
        "gradient-growth updates, soft-bound density and shrinking widths from the trainer's cost log).",
        "",
    ]
    return "".join(line + "\n" for line in lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10: ImageFolder copy or torchvision cache")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--runs", default=str(ROOT / "runs" / "cifar10_cpu"), help="folder of the run folders")
    p.add_argument("--out", default=str(common.RESULTS), help="folder of cifar10_cpu.json/.md")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="1 epoch, tiny schedules: checks the script only")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        "protocol": str(PROTOCOL.relative_to(ROOT)) + (" (smoke overrides)" if args.smoke else ""),
        "protocol_summary": (
            "CIFAR ResNet-20, 50,000 training images, 2 epochs of batch 128 (780 steps), SGD + cosine LR, "
            "density 0.1 (ERK), updates every 50 steps until 75%; Chase channel events every 100 steps until "
            "80%; final model on the 10,000 test images."
        ),
        "overrides": args.set + (SMOKE if args.smoke else []),
        "machine": common.machine("cpu"),
        "load_average_start": os.getloadavg(),
        "rows": [],
    }
    out = pathlib.Path(args.out)
    for method in args.methods:
        payload["rows"].append(train_method(method, args))
        payload["total_train_minutes"] = sum(r["train_seconds"] for r in payload["rows"]) / 60
        payload["load_average_end"] = os.getloadavg()
        common.write("cifar10_cpu", payload, markdown(payload), folder=out)
        log.info("%s", json.dumps({k: v for k, v in payload["rows"][-1].items() if k != "config"}))
    payload["throughput"] = measure_throughput(payload["rows"], args)
    payload["load_average_end"] = os.getloadavg()
    common.write("cifar10_cpu", payload, markdown(payload), folder=out)
    print(markdown(payload))


if __name__ == "__main__":
    main()
