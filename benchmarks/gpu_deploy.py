"""Deployable speed of Chase's widths on a GPU (issue 26, item 5a), written to fit one device call.

ResNet-50 224, bf16, channels-last, batch 1 / 32 / 256: the dense model against untrained Chase widths
(``chase.untrained_slim``, prune_skip) chosen five ways -- by score at S_c 0.4 (the paper), uniform and
latency-weighted at the MACs of that score set, by this GPU's roofline at a latency budget of 0.5 (ranked
by score per predicted ms), and by a latency table profiled here (eager, whole groups: a table profiled
under Inductor compiles once per point, which does not fit a device call for ResNet-50) -- each deployed
with ``chase.deploy`` under eager PyTorch and Inductor (max-autotune; CUDA graphs up to batch 32), dense and
slim under the same backend, timed alternately. Results go to ``--out`` after every model and backend, so a
call cut short returns what it measured. TF32 is recorded as PyTorch has it (this script changes no
setting).

    python benchmarks/gpu_deploy.py --device cuda --out $OUT                 # the device call
    python benchmarks/gpu_deploy.py --device cpu --quick --out /tmp/gd       # smoke test (tiny, CPU)
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch

from chase import Budget, ChannelSpec, count_flops, untrained_slim
from chase.bench import benchmark
from chase.models import get_model
from chase.profile import profile_latency
from chase.sparsifier.latency import LatencyTable
from chase.sparsifier.roofline import Roofline, measure_device
from common import RESULTS, machine, write


def device_roofline(dev: torch.device, dtype: str, batch: int) -> Roofline:
    """This GPU's preset when there is one (its name), else the device measured now."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev).lower()
        for key in ("h200", "h100", "a100", "l4", "t4"):
            if key in name:
                return Roofline(key, batch_size=batch)
    return Roofline(measure_device(dev.type, dtype, repeats=10), batch_size=batch)


def build(args: argparse.Namespace, dev: torch.device) -> tuple[dict, dict]:
    size = 32 if args.quick else 224
    torch.manual_seed(0)
    dense = get_model(args.model or ("resnet18" if args.quick else "resnet50"), num_classes=1000).eval()
    x = torch.zeros(1, 3, size, size)
    base = ChannelSpec(channel_sparsity=0.4, prune_skip=True, channel_multiple=8)
    info: dict = {"model": args.model or ("resnet18" if args.quick else "resnet50"), "input": size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"dense": dense, "score": untrained_slim(dense, x, channels=base)}
        ratio = count_flops(models["score"], x).dense / count_flops(dense, x).dense
        info["macs_ratio_of_score"] = ratio
        budget = Budget.macs(round(ratio, 4))
        models["uniform"] = untrained_slim(
            dense, x, channels=base.replace(channel_rank="uniform"), budget=budget
        )
        roof = device_roofline(dev, args.dtype, max(args.batch_sizes))
        info["roofline"] = roof.to_dict()
        weighted = base.replace(channel_rank="latency_weighted")
        models["latency-weighted"] = untrained_slim(
            dense, x, channels=weighted, budget=Budget.macs(ratio, roof)
        )
        by_roof = base.replace(channel_rank="score_per_cost")
        models["roofline"] = untrained_slim(dense, x, channels=by_roof, budget=Budget.latency(0.5, roof))
        if args.table:  # a table measured earlier (a CPU profile takes long)
            table = LatencyTable.load(args.table)
            info["table"] = {"path": args.table, "meta": table.meta}
            models["table"] = untrained_slim(dense, x, channels=by_roof, budget=Budget.latency(0.5, table))
            models["latency-weighted-table"] = untrained_slim(
                dense, x, channels=weighted, budget=Budget.macs(0.5, table)
            )
        elif not args.no_table:
            t0 = time.time()
            table = profile_latency(
                dense.to(dev),
                torch.randn(args.table_batch, 3, size, size, device=dev),
                base,
                fractions=(0.5,),
                dtype=args.dtype,
                channels_last=dev.type == "cuda",
                repeats=3,
            )
            dense.cpu()
            info["table_s"] = time.time() - t0
            info["table"] = table.to_dict()
            models["table"] = untrained_slim(dense, x, channels=by_roof, budget=Budget.latency(0.5, table))
    return models, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batch-sizes", default="1,32,256")
    ap.add_argument("--backends", default="eager,inductor")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--inductor-mode",
        default="max-autotune",
        choices=("max-autotune", "default"),
        help="default: no autotuning (CUDA graphs still, up to batch 32), when max-autotune does not fit",
    )
    ap.add_argument(
        "--budget-s", type=float, default=480, help="no new configuration after this many seconds"
    )
    ap.add_argument("--table-batch", type=int, default=32)
    ap.add_argument(
        "--no-table", action="store_true", help="skip the latency table (its profile takes minutes)"
    )
    ap.add_argument(
        "--table",
        default="",
        help="a latency table measured earlier (chase profile) instead of profiling one: widths 'table' "
        "(latency 0.5 by it) and 'latency-weighted-table' (MACs 0.5, weighed by it)",
    )
    ap.add_argument("--widths", default="", help="comma-separated width sets to time (default: all built)")
    ap.add_argument("--model", default="", help="default resnet50 (--quick: resnet18)")
    ap.add_argument(
        "--quick", action="store_true", help="ResNet-18 at 32 px, batch 1 and 4, fp32 (smoke test)"
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="gpu_deploy")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dev = torch.device(args.device)
    if args.quick:
        args.batch_sizes, args.repeats, args.dtype = "1,4", 2, "fp32"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    start = time.time()
    models, info = build(args, dev)
    size = 32 if args.quick else 224
    x = torch.zeros(1, 3, size, size)
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    info["inductor_mode"] = args.inductor_mode
    payload = {"machine": machine(str(dev)), "info": info, "macs": macs, "results": [], "skipped": []}
    payload["build_s"] = time.time() - start
    for backend in args.backends.split(","):
        wanted = args.widths.split(",") if args.widths else list(models)
        for label in [k for k in models if k != "dense" and k in wanted]:
            if time.time() - start > args.budget_s:
                payload["skipped"].append({"backend": backend, "reason": f"{label}: time budget spent"})
                continue
            res = benchmark(
                {"dense": models["dense"], label: models[label]},
                (3, size, size),
                batch_sizes=args.batch_sizes,
                dtypes=(args.dtype,),
                device=dev,
                channels_last=(dev.type == "cuda",),
                backends=(backend,),
                warmup=2 if args.quick else 10,
                repeats=args.repeats,
                macs=macs,
                inductor_mode=args.inductor_mode,
            )
            payload["results"] += res["results"]
            payload["skipped"] += res["skipped"]
            payload["meta"] = res["meta"]
            payload["wall_s"] = time.time() - start
            write(args.stem, payload, markdown(payload), folder=Path(args.out))
    print(markdown(payload))


#: what each width set is, for the results' text.
WIDTHS = {
    "score": "S_c 0.4 by score (the paper's ranking)",
    "uniform": "the score set's MACs, every group losing the same share",
    "latency-weighted": "the score set's MACs, latency-weighted by this device's roofline",
    "roofline": "a latency budget of 0.5 by this device's roofline (fused), ranked by score per predicted ms",
    "table": "a latency budget of 0.5 by the latency table, ranked by score per predicted ms",
    "latency-weighted-table": "a MACs budget of 0.5, latency-weighted by the latency table",
}


def markdown(p: dict) -> str:
    m = p.get("meta", {})
    info = p["info"]
    timed = list(dict.fromkeys(r["model"] for r in p["results"] if r["model"] != "dense"))
    table = info.get("table", {})
    source = (
        f"the committed table {table['path']}"
        if "path" in table
        else "a table profiled here (eager, fractions 0.5)"
        if table
        else ""
    )
    lines = [
        f"# Deployable speed of Chase's widths ({info['model']} {info['input']}, untrained widths)",
        "",
        f"{m.get('device_name', '?')}, torch {m.get('torch', '?')}, {m.get('threads', '?')} threads, TF32 "
        f"{'on' if m.get('tf32') else 'off'}, {p['machine']['date']}. Untrained widths "
        "(`chase.untrained_slim`, prune_skip, multiples of 8): "
        + "; ".join(f"`{k}`: {WIDTHS.get(k, k)}" for k in timed)
        + (f" (the latency table: {source})" if source else "")
        + ". Dense and slim deployed with `chase.deploy` under the same backend (Inductor mode "
        f"{info.get('inductor_mode', 'max-autotune')}), timed alternately; speedup = the dense median over "
        "the slim median, (min-max) over the alternating repeats.",
        "",
        "| widths | MACs | backend | dtype | batch | CUDA graphs | dense ms | slim ms | speedup "
        "| (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = p["results"]  # per batch: the dense row, then the slim row it was timed with
    for i, r in enumerate(rows):
        if r["model"] == "dense" or i == 0:
            continue
        d = rows[i - 1] if rows[i - 1]["model"] == "dense" else None
        macs = p["macs"][r["model"]] / p["macs"]["dense"]
        lo, hi = r["speedup_spread"]
        lines.append(
            f"| {r['model']} | {macs:.3f} | {r['backend']} | {r['dtype']} | {r['batch_size']} | "
            f"{r.get('cuda_graphs', '-')} | {d['latency_ms'] if d else float('nan'):.2f} | "
            f"{r['latency_ms']:.2f} | {r['speedup']:.2f}x | {lo:.2f}-{hi:.2f} |"
        )
    for s in p["skipped"]:
        lines.append(f"- skipped {s['backend']} batch {s.get('batch_size', '-')}: {s['reason']}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
