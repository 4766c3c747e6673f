"""The issue's speedup target on this CPU: ResNet-50 (224x224) at Chase S_c = 0.4 with prune_skip, batch
32, fp32 -- slim vs dense images/s under PyTorch eager and torch.compile (Inductor with inference freezing),
each contiguous and channels_last, and onnxruntime (CPUExecutionProvider, same thread count).

Dense and slim are timed alternately, one runtime after the other, in one ``chase.bench.benchmark``
call, on the same inputs, median of repeats after warm-up; the ONNX files are checked against PyTorch first
(``chase.onnx.check_onnx``). The slim model has the WIDTH OF CHASE'S FINAL NETWORK WITH CHANNELS PICKED
AT INITIALISATION, NOT A TRAINED RUN (``chase.untrained_slim``; no ResNet-50 can be trained
on ImageNet on this machine): a trained run removes as many channels, chosen from trained weights.

    python benchmarks/resnet50_target.py                 # writes results/resnet50_target.{json,md}
    python benchmarks/resnet50_target.py --quick         # smoke test: ResNet-18 at 64px, to /tmp
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import tempfile
from typing import Any

import torch

from chase import ChannelSpec, count_flops, untrained_slim
from chase.bench import benchmark
from chase.models import get_model
from chase.onnx import check_onnx, export_onnx
from common import RESULTS, machine, write

TARGET = 1.7
NOTE = (
    "slim = width of Chase's final network at S_c=0.4 with prune_skip, channels picked at initialisation "
    "(UMM of the initial weights), not a trained run"
)


def markdown(p: dict[str, Any]) -> str:
    m = p["machine"]
    lines = [
        f"# {p['model']} ({p['size']}x{p['size']}), Chase S_c 0.4 + prune_skip, batch {p['batch']}: "
        "slim vs dense",
        "",
        f"{m['cpu']} ({m['cpu_count']} cores, {p['threads']} threads), torch {m['torch']}, "
        f"onnxruntime {p['onnxruntime']}, fp32, median of {p['repeats']} after {p['warmup']} warm-up, "
        "dense and slim timed alternately, one runtime after the other; "
        f"load average {p['loadavg_start']} at start, {p['loadavg_end']} at end; "
        f"{m['date']}. {NOTE}. MACs: dense {p['macs']['dense']:,}, slim {p['macs']['slim']:,} "
        f"(ratio {p['macs']['slim'] / p['macs']['dense']:.3f}, implied speedup "
        f"{p['macs']['dense'] / p['macs']['slim']:.2f}x). "
        f"ONNX vs PyTorch max |diff|: {p['onnx_max_diff']:.2e}.",
        "",
        "| runtime | dense images/s | slim images/s | speedup | target 1.7x |",
        "|---|---|---|---|---|",
    ]
    for r in p["summary"]:
        lines.append(
            f"| {r['runtime']} | {r['dense']:.1f} | {r['slim']:.1f} | {r['speedup']:.2f}x | "
            f"{'met' if r['speedup'] >= TARGET else 'not met'} |"
        )
    failed = [s for s in p["bench"]["skipped"] if "batch_size" in s]
    if failed:
        lines += ["", "Failed, so not in the table:"]
        lines += [
            f"- channels_last={s['channels_last']} compiled={s['compiled']}: {s['reason']}" for s in failed
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 64px, 2 repeats, results to /tmp")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --quick: /tmp)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    name, size = ("resnet18", 64) if args.quick else ("resnet50", 224)
    batch, repeats = (4, 2) if args.quick else (args.batch, args.repeats)
    out = pathlib.Path(args.out or ("/tmp/resnet50_target" if args.quick else RESULTS))
    torch.manual_seed(0)
    dense = get_model(name, num_classes=1000).eval()
    x1 = torch.zeros(1, 3, size, size)
    slim = untrained_slim(dense, x1, channels=ChannelSpec(channel_sparsity=0.4, prune_skip=True))
    macs = {"dense": count_flops(dense, x1).dense, "slim": count_flops(slim, x1).dense}
    import onnxruntime

    payload: dict[str, Any] = {
        "machine": machine(),
        "model": name,
        "size": size,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": args.warmup,
        "onnxruntime": onnxruntime.__version__,
        "slim": NOTE,
        "macs": macs,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        diffs = []
        for label, model in (("dense", dense), ("slim", slim)):
            files[label] = export_onnx(model, x1, pathlib.Path(tmp) / f"{label}.onnx")
            diffs.append(check_onnx(files[label], model, torch.randn(2, 3, size, size))["max_abs_diff"])
        payload["onnx_max_diff"] = max(diffs)
        bench = benchmark(
            {"dense": dense, "slim": slim},
            (3, size, size),
            batch_sizes=(batch,),
            channels_last=(False, True),
            backends=("eager", "inductor", "onnxruntime"),
            warmup=args.warmup,
            repeats=repeats,
            macs=macs,
        )
    payload["bench"] = bench
    payload["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    rows = bench["results"]

    def rate(model: str, backend: str, cl: bool) -> float | None:
        return next(
            (
                r["throughput"]
                for r in rows
                if (r["model"], r["backend"], r["channels_last"]) == (model, backend, cl)
            ),
            None,
        )

    runtimes = (
        ("PyTorch eager", "eager", False),
        ("PyTorch eager, channels_last", "eager", True),
        ("torch.compile, freezing", "inductor", False),
        ("torch.compile, freezing, channels_last", "inductor", True),
        ("onnxruntime", "onnxruntime", False),
    )
    payload["summary"] = []
    for rt, be, cl in runtimes:  # a configuration that failed (see bench["skipped"]) has no row
        d, s = rate("dense", be, cl), rate("slim", be, cl)
        if d is not None and s is not None:
            payload["summary"].append({"runtime": rt, "dense": d, "slim": s})
    for r in payload["summary"]:
        r["speedup"] = r["slim"] / r["dense"]
    write("resnet50_target", payload, markdown(payload), folder=out)
    print(markdown(payload))


if __name__ == "__main__":
    main()
