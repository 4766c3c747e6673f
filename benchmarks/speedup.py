"""Inference speedup of Chase's slim networks over the dense ones (eager; CPU by default, or a GPU).

For ResNet-50 (224x224) and the CIFAR models cifar_resnet18 / cifar_resnet50 / cifar_vgg19_bn (32x32),
at Chase channel sparsity S_c 0.3 / 0.4 / 0.5 with and without prune_skip: images/s and latency of the
dense model and of the slim one at every batch size and dtype, median of repeats, every model of a row set
timed alternately (round robin) in the same process, via ``chase.bench.benchmark``. Each row states the
realised speedup, the GPU-supported FLOPs ratio (slim MACs / dense MACs, ``chase.count_flops``), the
speedup those FLOPs imply (1 / ratio), and whether the realised speedup is within 20% of it.

The slim widths are the WIDTH OF CHASE'S FINAL NETWORK WITH CHANNELS PICKED AT INITIALISATION, NOT A
TRAINED RUN (``chase.untrained_slim``: the whole S_c removed at once, channels ranked by
UMM of the initial weights masked at density 0.1, as Chase ranks them at its first event). A trained run
removes the same number of channels but chooses which ones (and so how the removal spreads over layers)
from trained weights, so its widths, and its speed, differ.

Target (issue 5, item 4a): ResNet-50 at S_c = 0.4 with prune_skip, batch 32, fp32 on the CPU: at least 1.7x.

    python benchmarks/speedup.py                         # writes results/speedup.{json,md}
    python benchmarks/speedup.py --models resnet50 --repeats 5
    python benchmarks/speedup.py --quick                 # seconds, tiny models (results/speedup_quick.*)
    python benchmarks/speedup.py --device cuda --models resnet50 --sparsities 0.3,0.4
        --batch-sizes 1,64,256 --dtypes fp32,bf16 --channels-last --repeats 30 --warmup 10 --stem gpu_resnet50
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from chase import ChannelSpec, count_flops, untrained_slim
from chase.bench import benchmark
from chase.models import get_model
from common import RESULTS, machine, write

MODELS = {
    "resnet50": 224,
    "cifar_resnet18": 32,
    "cifar_resnet50": 32,
    "cifar_vgg19_bn": 32,
    "timm:vit_small_patch16_224": 224,
}
QUICK_MODELS = {"cifar_resnet20": 32, "resnet18": 64}
SPARSITIES = (0.3, 0.4, 0.5)
TARGET = {"model": "resnet50", "channel_sparsity": 0.4, "prune_skip": True, "batch": 32, "speedup": 1.7}
TOLERANCE = 0.2  # realised speedup within 20% of the FLOPs-implied speedup
SLIM_NOTE = (
    "width of Chase's final network, channels picked at initialisation (UMM of the initial weights masked "
    "at density 0.1, all of S_c removed at once), not a trained run"
)


def _label(s: float, skip: bool) -> str:
    return f"sc{s}" + ("_skip" if skip else "")


def measure(
    name: str,
    size: int,
    sparsities,
    batch_sizes,
    repeats: int,
    warmup: int,
    device: str = "cpu",
    dtypes=("fp32",),
    channels_last: bool = False,
    prune_heads: bool = False,
) -> dict:
    """Dense and every slim width of one model, timed round robin in one ``benchmark`` call."""
    torch.manual_seed(0)
    dense = get_model(name, num_classes=10 if name.startswith("cifar_") else 1000).eval()
    x = torch.zeros(1, 3, size, size)
    models = {"dense": dense}
    configs = {}
    for s in sparsities:
        for skip in (False, True):
            models[_label(s, skip)] = untrained_slim(
                dense, x, channels=ChannelSpec(channel_sparsity=s, prune_skip=skip, prune_heads=prune_heads)
            )
            configs[_label(s, skip)] = (s, skip)
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    res = benchmark(
        models,
        (3, size, size),
        batch_sizes=batch_sizes,
        dtypes=dtypes,
        device=device,
        channels_last=(channels_last,),
        warmup=warmup,
        repeats=repeats,
        macs=macs,
    )
    by = {(r["model"], r["dtype"], r["batch_size"]): r for r in res["results"]}
    rows = []
    for k, (s, skip) in configs.items():
        for dtype in dtypes:
            for batch in batch_sizes:
                if (k, dtype, batch) not in by or ("dense", dtype, batch) not in by:
                    continue  # recorded in res["skipped"] with its reason
                d, sl = by[("dense", dtype, batch)], by[(k, dtype, batch)]
                ratio = macs[k] / macs["dense"]
                implied = 1.0 / ratio
                rows.append(
                    {
                        "model": name,
                        "input": size,
                        "channel_sparsity": s,
                        "prune_skip": skip,
                        "prune_heads": prune_heads,
                        "dtype": dtype,
                        "channels_last": channels_last,
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
                )
    return {"rows": rows, "bench": res}


def markdown(payload: dict) -> str:
    m = payload["machine"]
    rows = payload["rows"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    lines = [
        f"# Dense vs slim inference speedup ({where}, torch {m['torch']})",
        "",
        f"Device {m['device']}, dtypes {', '.join(payload['dtypes'])}, eager, channels_last "
        f"{payload['channels_last']}, batch sizes {', '.join(map(str, payload['batch_sizes']))}; median of "
        f"{payload['repeats']} forwards after {payload['warmup']} warm-up, dense and slim timed alternately "
        f"in one process. Date {m['date']}; load average (1/5/15 min) {payload['loadavg_start']} at start, "
        f"{payload['loadavg_end']} at end.",
        "",
        f"**Slim = {SLIM_NOTE}.** FLOPs ratio = slim MACs / dense MACs (GPU-supported FLOPs, "
        "`chase.count_flops`); implied = 1 / ratio; within 20% = |realised / implied - 1| <= 0.2.",
        "",
        "| model | input | S_c | prune_skip | heads | dtype | batch | dense img/s | slim img/s | dense ms | "
        "slim ms | speedup | FLOPs ratio | implied | realised/implied | within 20% |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['channel_sparsity']} | {r['prune_skip']} | "
            f"{r.get('prune_heads', False)} | {r['dtype']} | "
            f"{r['batch']} | {r['dense_images_s']:.1f} | {r['slim_images_s']:.1f} | "
            f"{r['dense_latency_ms']:.2f} | {r['slim_latency_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{r['flops_ratio']:.3f} | {r['flops_implied_speedup']:.2f}x | "
            f"{r['realised_over_implied']:.2f} | {'yes' if r['within_20pct'] else 'NO'} |"
        )
    t = payload.get("target")
    if t is not None:
        lines += [
            "",
            f"Target: {t['model']} at S_c={t['channel_sparsity']} with prune_skip, batch {t['batch']}, fp32 "
            f"on the CPU: >= {t['required']}x images/s. Measured: {t['measured']:.2f}x -> "
            f"{'met' if t['met'] else 'NOT met'}.",
        ]
    skipped = [s for b in payload["bench"].values() for s in b["skipped"]]
    for s in skipped:
        lines.append(f"\nskipped: {s}")
    lines.append("")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, seconds (smoke test)")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--sparsities", default=None, help="comma-separated S_c values (default 0.3,0.4,0.5)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per model (default 7; quick 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated (default 1,32; quick 1,4)")
    p.add_argument("--dtypes", default="fp32", help="comma-separated from fp32,bf16,fp16 (default fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true", help="time channels_last models and inputs")
    p.add_argument("--prune-heads", action="store_true", help="slim widths remove attention heads too")
    p.add_argument("--out", default=str(RESULTS), help="folder for the result files")
    p.add_argument("--stem", default=None, help="result file name (default speedup, quick speedup_quick)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = QUICK_MODELS if args.quick else MODELS
    if args.models:
        names = args.models.split(",")
        unknown = [n for n in names if n not in MODELS and n not in QUICK_MODELS]
        if unknown:
            p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
        table = {n: MODELS.get(n, QUICK_MODELS.get(n)) for n in names}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (2 if args.quick else 7)
    batch_sizes = [1, 4] if args.quick else _ints(args.batch_sizes)
    warmup = 1 if args.quick else args.warmup
    dtypes = args.dtypes.split(",")
    if args.sparsities:
        sparsities = tuple(float(v) for v in args.sparsities.split(","))
    else:
        sparsities = (0.5,) if args.quick else SPARSITIES
    stem = args.stem or ("speedup_quick" if args.quick else "speedup")
    out = Path(args.out)
    payload = {
        "machine": machine(args.device),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "dtypes": dtypes,
        "mode": "eager",
        "channels_last": args.channels_last,
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "warmup": warmup,
        "slim": SLIM_NOTE,
        "rows": [],
        "bench": {},
    }
    for name, size in table.items():
        r = measure(
            name,
            size,
            sparsities,
            batch_sizes,
            repeats,
            warmup,
            args.device,
            dtypes,
            args.channels_last,
            args.prune_heads,
        )
        payload["rows"] += r["rows"]
        payload["bench"][name] = r["bench"]
        for row in r["rows"]:
            print(
                f"{name} {size}px S_c={row['channel_sparsity']} skip={row['prune_skip']} {row['dtype']} "
                f"batch {row['batch']}: {row['dense_images_s']:.1f} -> {row['slim_images_s']:.1f} img/s = "
                f"{row['speedup']:.2f}x (FLOPs imply {row['flops_implied_speedup']:.2f}x)",
                flush=True,
            )
        payload["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        write(stem, payload, markdown(payload), folder=out)  # after every model: partial results survive
    hit = [
        r
        for r in payload["rows"]
        if r["model"] == TARGET["model"]
        and r["channel_sparsity"] == TARGET["channel_sparsity"]
        and r["prune_skip"] == TARGET["prune_skip"]
        and r["batch"] == TARGET["batch"]
        and r["dtype"] == "fp32"
        and args.device == "cpu"
    ]
    if hit:
        payload["target"] = {
            **{k: v for k, v in TARGET.items() if k != "speedup"},
            "required": TARGET["speedup"],
            "measured": hit[0]["speedup"],
            "met": hit[0]["speedup"] >= TARGET["speedup"],
        }
    write(stem, payload, markdown(payload), folder=out)


if __name__ == "__main__":
    main()
