"""PyTorch eager vs onnxruntime on this CPU (fp32): dense and slim CIFAR ResNet-20 and ResNet-18.

Every model is exported with ``chase.onnx.export_onnx`` (dynamic batch axis), checked against PyTorch
with ``chase.onnx.check_onnx`` (two batch sizes; the largest difference is recorded), then timed with
``chase.bench.benchmark``: PyTorch dense and slim alternately (round robin), then onnxruntime dense and
slim alternately (sessions whose idle threads sleep instead of spinning), in one process, on the same
inputs, both backends with the same number of intra-op threads. (Results from before 2026-11-26 21:00
timed all four in one round robin with spinning sessions; that is fair at 1 thread only.) Batch 1 and 32
(and 256 for ResNet-20); median of repeats after warm-up.

The slim models have the WIDTH OF CHASE'S FINAL NETWORK AT S_c = 0.5 WITH CHANNELS PICKED AT
INITIALISATION, NOT A TRAINED RUN (``chase.untrained_slim``, as in ``speedup.py``): a
trained run removes as many channels, chosen from trained weights, so its widths differ somewhat.

    python benchmarks/onnx_cpu.py                     # writes results/onnx_cpu.{json,md}
    python benchmarks/onnx_cpu.py --threads 1 --repeats 5
    python benchmarks/onnx_cpu.py --threads 2 --repeats 21 --name onnx_cpu_2threads
    python benchmarks/onnx_cpu.py --quick             # seconds, smoke test (results/onnx_cpu_quick.*)
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from chase import ChannelSpec, count_flops, untrained_slim
from chase.bench import benchmark
from chase.models import get_model
from chase.onnx import check_onnx, export_onnx
from common import machine, write

MODELS = {"cifar_resnet20": (1, 32, 256), "cifar_resnet18": (1, 32)}
CHANNEL_SPARSITY = 0.5
SLIM_NOTE = (
    f"width of Chase's final network at S_c={CHANNEL_SPARSITY} (no prune_skip), channels picked at "
    "initialisation (UMM of the initial weights, all of S_c removed at once), not a trained run"
)


def measure(name: str, size: int, batches, repeats: int, warmup: int, folder: Path) -> dict:
    """Export, check and time dense and slim ``name`` under both backends."""
    torch.manual_seed(0)
    dense = get_model(name, num_classes=10).eval()
    x = torch.zeros(1, 3, size, size)
    models = {
        "dense": dense,
        "slim": untrained_slim(dense, x, channels=ChannelSpec(channel_sparsity=CHANNEL_SPARSITY)),
    }
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    files, checks = {}, {}
    for k, m in models.items():
        files[k] = export_onnx(m, example, folder / f"{name}_{k}.onnx")
        checks[k] = {key: v for key, v in check_onnx(files[k], m, example).items() if key != "path"}
        checks[k]["onnx_bytes"] = files[k].stat().st_size
    res = benchmark(
        models,
        (3, size, size),
        batch_sizes=batches,
        dtypes=("fp32",),
        device="cpu",
        warmup=warmup,
        repeats=repeats,
        macs=macs,
        backends=("eager", "onnxruntime"),
    )
    by = {(r["model"], r["backend"], r["batch_size"]): r for r in res["results"]}
    rows = []
    for b in batches:
        keys = [(m, be, b) for be in ("eager", "onnxruntime") for m in ("dense", "slim")]
        if not all(k in by for k in keys):
            continue  # recorded in res["skipped"] with its reason
        t_d, t_s, o_d, o_s = (by[k] for k in keys)
        rows.append(
            {
                "model": name,
                "input": size,
                "batch": b,
                "torch_dense_images_s": t_d["throughput"],
                "torch_slim_images_s": t_s["throughput"],
                "ort_dense_images_s": o_d["throughput"],
                "ort_slim_images_s": o_s["throughput"],
                "torch_dense_latency_ms": t_d["latency_ms"],
                "torch_slim_latency_ms": t_s["latency_ms"],
                "ort_dense_latency_ms": o_d["latency_ms"],
                "ort_slim_latency_ms": o_s["latency_ms"],
                "slim_speedup_torch": t_s["throughput"] / t_d["throughput"],
                "slim_speedup_ort": o_s["throughput"] / o_d["throughput"],
                "ort_over_torch_dense": o_d["throughput"] / t_d["throughput"],
                "ort_over_torch_slim": o_s["throughput"] / t_s["throughput"],
                "ort_slim_over_torch_dense": o_s["throughput"] / t_d["throughput"],
                "flops_ratio": macs["slim"] / macs["dense"],
            }
        )
    return {"rows": rows, "checks": checks, "macs": macs, "bench": res}


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        f"# PyTorch eager vs onnxruntime, dense and slim ({m['cpu']}, threads: {payload['threads']})",
        "",
        f"Device {m['device']}, dtype {payload['dtype']}, torch {m['torch']} (eager), onnxruntime "
        f"{payload['onnxruntime']} (CPUExecutionProvider), {payload['threads']} intra-op threads each. "
        f"Median of {payload['repeats']} forwards after {payload['warmup']} warm-up; PyTorch's dense and "
        "slim timed alternately, then onnxruntime's (non-spinning sessions), in one process on the same "
        f"inputs. Date {m['date']}; load average (1/5/15 min) "
        f"{payload['loadavg_start']} at start, {payload['loadavg_end']} at end (the benchmark's own "
        f"threads count in the end value).",
        "",
        f"**Slim = {SLIM_NOTE}.** img/s = images per second; slim/dense = slim over dense on the same "
        "backend; ORT/torch = onnxruntime over PyTorch for the same model. FLOPs ratio = slim MACs / dense.",
        "",
        "| model | batch | torch dense img/s | torch slim img/s | ORT dense img/s | ORT slim img/s | "
        "slim/dense torch | slim/dense ORT | ORT/torch dense | ORT/torch slim | FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['torch_dense_images_s']:.1f} | "
            f"{r['torch_slim_images_s']:.1f} | {r['ort_dense_images_s']:.1f} | "
            f"{r['ort_slim_images_s']:.1f} | "
            f"{r['slim_speedup_torch']:.2f}x | {r['slim_speedup_ort']:.2f}x | "
            f"{r['ort_over_torch_dense']:.2f}x | {r['ort_over_torch_slim']:.2f}x | {r['flops_ratio']:.3f} |"
        )
    sizes = sorted(
        {b for checks in payload["checks"].values() for c in checks.values() for b in c["batch_sizes"]}
    )
    lines += ["", f"ONNX check (onnxruntime vs PyTorch, batch sizes {sizes}, random normal inputs):", ""]
    lines += ["| model | variant | max abs diff | max abs output | relative |", "|---|---|---|---|---|"]
    for name, checks in payload["checks"].items():
        for k, c in checks.items():
            lines.append(
                f"| {name} | {k} | {c['max_abs_diff']:.2e} | {c['max_abs_output']:.3g} | "
                f"{c['relative_diff']:.1e} |"
            )
    for b in payload["bench"].values():
        for s in b["skipped"]:
            lines.append(f"\nskipped: {s}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8x8 inputs, batches 1,4, two repeats (smoke test)")
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op threads of both backends (default: torch's)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per model (default 7; quick 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--name", default="onnx_cpu", help="results file stem in results/ (default onnx_cpu)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime

    if args.threads:
        torch.set_num_threads(args.threads)
    size = 8 if args.quick else 32
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = 1 if args.quick else args.warmup
    payload = {
        "machine": machine(),
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "dtype": "float32",
        "mode": "eager",
        "repeats": repeats,
        "warmup": warmup,
        "slim": SLIM_NOTE,
        "rows": [],
        "checks": {},
        "bench": {},
    }
    with tempfile.TemporaryDirectory(prefix="onnx-cpu-") as tmp:
        for name, batches in MODELS.items():
            r = measure(name, size, (1, 4) if args.quick else batches, repeats, warmup, Path(tmp))
            payload["rows"] += r["rows"]
            payload["checks"][name] = r["checks"]
            payload["bench"][name] = r["bench"]
            for row in r["rows"]:
                print(
                    f"{name} batch {row['batch']}: torch {row['torch_dense_images_s']:.1f} -> "
                    f"{row['torch_slim_images_s']:.1f} img/s, onnxruntime {row['ort_dense_images_s']:.1f} -> "
                    f"{row['ort_slim_images_s']:.1f} img/s",
                    flush=True,
                )
    payload["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    write(f"{args.name}_quick" if args.quick else args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
