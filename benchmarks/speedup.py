"""Inference speedup of Chase's slim networks over the dense ones on this CPU (fp32, eager).

For ResNet-50 (224x224) and the CIFAR models cifar_resnet18 / cifar_resnet50 / cifar_vgg19_bn (32x32),
at Chase channel sparsity S_c 0.3 / 0.4 / 0.5 with and without prune_skip: images/s at batch 32 and
latency at batch 1 of the dense model and of the slim one, median of repeats, every model of a row set
timed alternately (round robin) in the same process, via ``chase.bench.benchmark``. Each row states the
realised speedup, the GPU-supported FLOPs ratio (slim MACs / dense MACs, ``chase.count_flops``), the
speedup those FLOPs imply (1 / ratio), and whether the realised speedup is within 20% of it.

The slim widths are the WIDTH OF CHASE'S FINAL NETWORK WITH CHANNELS PICKED AT INITIALISATION, NOT A
TRAINED RUN (``chase.train.measure.untrained_slim``: the whole S_c removed at once, channels ranked by
UMM of the initial weights). A trained run removes the same number of channels but chooses which ones
(and so how the removal spreads over layers) from trained weights, so its widths, and its speed, differ.

Target (issue 5, item 4a): ResNet-50 at S_c = 0.4 with prune_skip, batch 32: at least 1.7x images/s.

    python benchmarks/speedup.py                         # writes results/speedup.{json,md}
    python benchmarks/speedup.py --models resnet50 --repeats 5
    python benchmarks/speedup.py --quick                 # seconds, tiny models (results/speedup_quick.*)
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from chase import count_flops
from chase.bench import benchmark
from chase.models import get_model
from chase.train.measure import untrained_slim
from common import machine, write

MODELS = {"resnet50": 224, "cifar_resnet18": 32, "cifar_resnet50": 32, "cifar_vgg19_bn": 32}
QUICK_MODELS = {"cifar_resnet20": 32, "resnet18": 64}
SPARSITIES = (0.3, 0.4, 0.5)
TARGET = {"model": "resnet50", "channel_sparsity": 0.4, "prune_skip": True, "batch": 32, "speedup": 1.7}
TOLERANCE = 0.2  # realised speedup within 20% of the FLOPs-implied speedup
SLIM_NOTE = (
    "width of Chase's final network, channels picked at initialisation (UMM of the initial weights, "
    "all of S_c removed at once), not a trained run"
)


def _label(s: float, skip: bool) -> str:
    return f"sc{s}" + ("_skip" if skip else "")


def measure(name: str, size: int, sparsities, batch: int, repeats: int, warmup: int) -> dict:
    """Dense and every slim width of one model, timed round robin in one ``benchmark`` call."""
    torch.manual_seed(0)
    dense = get_model(name, num_classes=10 if name.startswith("cifar_") else 1000).eval()
    x = torch.zeros(1, 3, size, size)
    models = {"dense": dense}
    configs = {}
    for s in sparsities:
        for skip in (False, True):
            models[_label(s, skip)] = untrained_slim(dense, x, s, prune_skip=skip)
            configs[_label(s, skip)] = (s, skip)
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    res = benchmark(
        models,
        (3, size, size),
        batch_sizes=(1, batch),
        dtypes=("fp32",),
        device="cpu",
        warmup=warmup,
        repeats=repeats,
        macs=macs,
    )
    by = {(r["model"], r["batch_size"]): r for r in res["results"]}
    rows = []
    for k, (s, skip) in configs.items():
        if (k, batch) not in by or ("dense", batch) not in by:
            continue  # recorded in res["skipped"] with its reason
        d, sl = by[("dense", batch)], by[(k, batch)]
        ratio = macs[k] / macs["dense"]
        implied = 1.0 / ratio
        row = {
            "model": name,
            "input": size,
            "channel_sparsity": s,
            "prune_skip": skip,
            "batch": batch,
            "dense_images_s": d["throughput"],
            "slim_images_s": sl["throughput"],
            "dense_latency_ms": d["latency_ms"],
            "slim_latency_ms": sl["latency_ms"],
            "speedup": sl["speedup"],
            "dense_macs": macs["dense"],
            "slim_macs": macs[k],
            "flops_ratio": ratio,
            "flops_implied_speedup": implied,
            "realised_over_implied": sl["speedup"] / implied,
            "within_20pct": abs(sl["speedup"] / implied - 1.0) <= TOLERANCE,
            "dense_params": params["dense"],
            "slim_params": params[k],
        }
        if ("dense", 1) in by and (k, 1) in by:
            row["dense_latency_b1_ms"] = by[("dense", 1)]["latency_ms"]
            row["slim_latency_b1_ms"] = by[(k, 1)]["latency_ms"]
            row["speedup_b1"] = by[(k, 1)]["speedup"]
        rows.append(row)
    return {"rows": rows, "bench": res}


def markdown(payload: dict) -> str:
    m = payload["machine"]
    rows = payload["rows"]
    lines = [
        f"# Dense vs slim inference speedup ({m['cpu']}, {m['torch_threads']} threads, torch {m['torch']})",
        "",
        f"Device {m['device']}, dtype {payload['dtype']}, eager, batch {payload['batch']} (throughput) and 1 "
        f"(latency); median of {payload['repeats']} forwards after {payload['warmup']} warm-up, dense and "
        f"slim timed alternately in one process. Date {m['date']}; load average (1/5/15 min) "
        f"{payload['loadavg_start']} at start, {payload['loadavg_end']} at end (the benchmark's own "
        f"{m['torch_threads']} threads count in the end value).",
        "",
        f"**Slim = {SLIM_NOTE}.** FLOPs ratio = slim MACs / dense MACs (GPU-supported FLOPs, "
        "`chase.count_flops`); implied = 1 / ratio; within 20% = |realised / implied - 1| <= 0.2.",
        "",
        "| model | input | S_c | prune_skip | dense img/s | slim img/s | speedup | FLOPs ratio | implied | "
        "realised/implied | within 20% | b1 dense ms | b1 slim ms | b1 speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b1 = (
            f"{r['dense_latency_b1_ms']:.1f} | {r['slim_latency_b1_ms']:.1f} | {r['speedup_b1']:.2f}x"
            if "speedup_b1" in r
            else "| |"
        )
        lines.append(
            f"| {r['model']} | {r['input']} | {r['channel_sparsity']} | {r['prune_skip']} | "
            f"{r['dense_images_s']:.1f} | {r['slim_images_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['flops_ratio']:.3f} | {r['flops_implied_speedup']:.2f}x | "
            f"{r['realised_over_implied']:.2f} | "
            f"{'yes' if r['within_20pct'] else 'NO'} | {b1} |"
        )
    t = payload.get("target")
    if t is not None:
        lines += [
            "",
            f"Target: {t['model']} at S_c={t['channel_sparsity']} with prune_skip, batch {t['batch']}: "
            f">= {t['required']}x images/s. Measured: {t['measured']:.2f}x -> "
            f"{'met' if t['met'] else 'NOT met'}.",
        ]
    skipped = [s for b in payload["bench"].values() for s in b["skipped"]]
    for s in skipped:
        lines.append(f"\nskipped: {s}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, seconds (smoke test)")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per model (default 7; quick 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = QUICK_MODELS if args.quick else MODELS
    if args.models:
        names = args.models.split(",")
        unknown = [n for n in names if n not in MODELS and n not in QUICK_MODELS]
        if unknown:
            p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
        table = {n: MODELS.get(n, QUICK_MODELS.get(n)) for n in names}
    repeats = args.repeats or (2 if args.quick else 7)
    batch = 4 if args.quick else args.batch
    warmup = 1 if args.quick else args.warmup
    sparsities = (0.5,) if args.quick else SPARSITIES
    payload = {
        "machine": machine(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "dtype": "float32",
        "mode": "eager",
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "slim": SLIM_NOTE,
        "rows": [],
        "bench": {},
    }
    for name, size in table.items():
        r = measure(name, size, sparsities, batch, repeats, warmup)
        payload["rows"] += r["rows"]
        payload["bench"][name] = r["bench"]
        for row in r["rows"]:
            print(
                f"{name} {size}px S_c={row['channel_sparsity']} skip={row['prune_skip']}: "
                f"{row['dense_images_s']:.1f} -> {row['slim_images_s']:.1f} img/s = {row['speedup']:.2f}x "
                f"(FLOPs imply {row['flops_implied_speedup']:.2f}x)",
                flush=True,
            )
    payload["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    hit = [
        r
        for r in payload["rows"]
        if r["model"] == TARGET["model"]
        and r["channel_sparsity"] == TARGET["channel_sparsity"]
        and r["prune_skip"] == TARGET["prune_skip"]
        and r["batch"] == TARGET["batch"]
    ]
    if hit:
        payload["target"] = {
            **{k: v for k, v in TARGET.items() if k != "speedup"},
            "required": TARGET["speedup"],
            "measured": hit[0]["speedup"],
            "met": hit[0]["speedup"] >= TARGET["speedup"],
        }
    write("speedup_quick" if args.quick else "speedup", payload, markdown(payload))


if __name__ == "__main__":
    main()
