"""Does the roofline predict what the CPU measures? (issue 26, item 2)

This CPU's roofline is measured first (``chase.sparsifier.roofline.measure_device``: a convolution's
FLOP/s, a large add's bandwidth, a tiny op's overhead, the channel tile). Then, for ResNet-50 (224, batch
32), CIFAR ResNet-18 and CIFAR ResNet-20 (32, batch 128), untrained Chase widths
(``chase.untrained_slim``, prune_skip) are built four ways at the same budget:

- ``score``: a MACs budget of 0.5, channels by score (the paper's ranking);
- ``uniform``: the same budget, every group losing the same share;
- ``latency-weighted``: the same budget, a group's share growing with its time per MAC (ResNet-50: the
  committed CPU latency table; the CIFAR networks: this CPU's roofline as the cost model);
- ``roofline``: a latency budget of 0.5 predicted by this CPU's roofline (fused), widths in multiples of
  its tile, channels by score per predicted ms saved.

Every slim model and the dense one are deployed under Inductor (freezing) and timed alternately
(``chase.bench.benchmark``), and under eager PyTorch; the roofline's predicted speedups (fused for
Inductor, eager for eager) stand next to the measured ones, with the error. UNTRAINED widths: the
question is the cost model, not accuracy.

    python benchmarks/roofline_cpu.py                 # ~20 minutes on this 2-core CPU, idle
    python benchmarks/roofline_cpu.py --quick         # smoke test (CIFAR ResNet-18 at 16 px, batch 4)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import warnings
from pathlib import Path

import torch

from chase import Budget, ChannelSpec, count_flops, untrained_slim
from chase.bench import benchmark
from chase.models import get_model
from chase.sparsifier.roofline import Roofline, measure_device
from common import RESULTS, machine, write

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "resnet50": (224, 1000, 32, ROOT / "benchmarks" / "results" / "resnet50_latency_table_cpu.json"),
    "cifar_resnet18": (32, 10, 128, None),
    "cifar_resnet20": (32, 10, 128, None),
}


def widths(name: str, size: int, classes: int, batch: int, table: Path | None, device: object) -> dict:
    torch.manual_seed(0)
    dense = get_model(name, num_classes=classes).eval()
    x = torch.zeros(1, 3, size, size)
    fused = Roofline(device, fused=True, batch_size=batch)
    spec = ChannelSpec(channel_sparsity=0.5, prune_skip=True, channel_multiple=1)
    weigh = table if table is not None and table.is_file() else fused
    builds = {
        "score": (spec, Budget.macs(0.5)),
        "uniform": (spec.replace(channel_rank="uniform"), Budget.macs(0.5)),
        "latency-weighted": (spec.replace(channel_rank="latency_weighted"), Budget.macs(0.5, weigh)),
        # channel_multiple unset: the device's tile, as a user of the roofline gets it
        "roofline": (
            spec.replace(channel_rank="score_per_cost", channel_multiple=None),
            Budget.latency(0.5, fused),
        ),
    }
    models = {"dense": dense}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, (channels, budget) in builds.items():
            models[key] = untrained_slim(dense, x, channels=channels, budget=budget)
            logging.info("%s %s built", name, key)
    return {"models": models, "weigh": "table" if weigh is table else "roofline"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="roofline_cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = measure_device("cpu", repeats=5 if args.quick else 30)
    payload: dict = {"machine": machine("cpu"), "device": dataclasses.asdict(device), "models": {}}
    for name in args.models.split(","):
        size, classes, batch, table = MODELS[name]
        if args.quick:
            size, batch = 16, 4
        built = widths(name, size, classes, batch, table, device)
        models = built["models"]
        x = torch.zeros(1, 3, size, size)
        macs = {k: count_flops(m, x).dense for k, m in models.items()}
        predicted = {}
        for fused in (True, False):
            roof = Roofline(device, fused=fused, batch_size=batch)
            ms = {k: roof.predict_ms(m, x) for k, m in models.items()}
            predicted["inductor" if fused else "eager"] = {
                k: ms["dense"] / v for k, v in ms.items() if k != "dense"
            }
        res = benchmark(
            models,
            (3, size, size),
            batch_sizes=(batch,),
            backends=("eager", "inductor"),
            warmup=2,
            repeats=2 if args.quick else args.repeats,
            macs=macs,
            meta={"model": name, "input": size},
        )
        rows = []
        for r in res["results"]:
            if r["model"] == "dense":
                continue
            pred = predicted[r["backend"]][r["model"]]
            rows.append(
                {
                    "model": name,
                    "widths": r["model"],
                    "backend": r["backend"],
                    "batch": batch,
                    "macs_ratio": macs[r["model"]] / macs["dense"],
                    "measured": r["speedup"],
                    "measured_spread": r["speedup_spread"],
                    "predicted": pred,
                    "error": pred / r["speedup"] - 1.0,
                }
            )
        payload["models"][name] = {"bench": res, "rows": rows, "latency_weighted_by": built["weigh"]}
        write(args.stem, payload, markdown(payload), folder=Path(args.out))  # partial results as it goes
    print(markdown(payload))


def markdown(payload: dict) -> str:
    d = payload["device"]
    m = payload["machine"]
    lines = [
        "# The roofline's predicted speedups against measured ones (CPU)",
        "",
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, fp32, {m['date']}. This CPU's "
        f"roofline, measured: {d['flops'] / 1e9:.1f} GFLOP/s (a 3x3 convolution), {d['bandwidth'] / 1e9:.1f} "
        f"GB/s (a large add), {d['launch_eager'] * 1e6:.1f} us per eager op, a channel tile of "
        f"{d.get('tile', 1)}. UNTRAINED widths (`chase.untrained_slim`, prune_skip, S_c 0.5 floors): "
        "`score`, `uniform`, `latency-weighted` at MACs 0.5 (any width); `roofline` at a latency budget of "
        "0.5 by this roofline (fused), ranked by score per predicted ms, in multiples of the tile. Measured: "
        "medians of alternating timings (`chase.bench.benchmark`), dense and slim under the same backend; "
        "predicted: the roofline fused (Inductor) or eager.",
        "",
        "| model | widths | batch | MACs | backend | measured | (min-max) | predicted | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for entry in payload["models"].values():
        for r in entry["rows"]:
            lo, hi = r["measured_spread"]
            lines.append(
                f"| {r['model']} | {r['widths']} | {r['batch']} | {r['macs_ratio']:.3f} | {r['backend']} | "
                f"{r['measured']:.2f}x | {lo:.2f}-{hi:.2f} | {r['predicted']:.2f}x | "
                f"{100 * r['error']:+.0f}% |"
            )
            errors.append(abs(r["error"]))
    if errors:
        lines += [
            "",
            f"Absolute error over the {len(errors)} rows: median {100 * statistics.median(errors):.0f}%, "
            f"largest {100 * max(errors):.0f}%; within 20%: {sum(e <= 0.2 for e in errors)} of "
            f"{len(errors)}.",
        ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
