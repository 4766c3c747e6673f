"""Does rounding widths to a multiple of m make a slim model faster at the same MACs budget?

For each model, Chase's untrained final widths (``chase.untrained_slim``: channels ranked on ERK-masked
initial weights at d = 0.1, removed at once) under the same MACs budget (``target="macs"``) with
``channel_multiple`` 1, 8 and 16, timed next to the dense model alternately in one ``chase.bench.benchmark``
call per configuration (eager and torch.compile with inference freezing). UNTRAINED widths: the
question is how the hardware treats the shapes, not accuracy.

    python benchmarks/channel_multiple.py                      # this CPU: ResNet-50 224 and CIFAR ResNet-18
    python benchmarks/channel_multiple.py --device cuda --dtypes bf16 --batch-sizes 64,256
    python benchmarks/channel_multiple.py --quick              # smoke test (CIFAR ResNet-18, eager, batch 2)

With ``--ranks score,score_per_cost,normalized,uniform,latency_weighted`` each multiple is also built with
channels ranked by score per MAC saved, by score over the group's mean, the same share of every group,
and a share growing with the group's time per MAC by ``--latency-table FILE`` (``chase profile``)
(``channel_rank``), with ``--exponents 0.25,0.5,1`` for each of those exponents of the time per MAC
(suffix ``-0.25`` ...); ``--channels-last both`` also times channels-last models and inputs; with a table
and ``--latency-ratio`` also by that latency budget. With a table, its predicted speedup is reported next
to the measured one.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch

from chase import Budget, ChannelSpec, count_flops, untrained_slim
from chase.bench import benchmark
from chase.models import get_model
from chase.sparsifier.latency import LatencyTable
from chase.sparsifier.rankings import RANKINGS, LatencyWeighted
from common import RESULTS, machine, write

MODELS = {"resnet50": (224, 1000), "cifar_resnet18": (32, 10)}


def widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def run(name: str, args: argparse.Namespace) -> dict:
    size, classes = MODELS[name]
    size = args.input or size
    x = torch.zeros(1, 3, size, size)
    torch.manual_seed(0)
    dense = get_model(name, num_classes=classes).eval()
    models = {"dense": dense}
    table = LatencyTable.load(args.latency_table) if args.latency_table else None
    budgets = {"": Budget.macs(args.macs_ratio)}
    if table is not None and args.latency_ratio is not None:
        budgets["lat-"] = Budget.latency(args.latency_ratio, table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prefix, budget in budgets.items():
            for rank in args.ranks:
                for m in args.multiples:
                    key = f"{prefix}m{m}" + ("" if rank == "score" else f"-{rank.replace('_', '-')}")
                    spec = ChannelSpec(channel_sparsity=0.6, prune_skip=True, channel_multiple=m)
                    if rank != "latency_weighted":
                        spec = spec.replace(channel_rank=rank)
                        models[key] = untrained_slim(dense, x, channels=spec, budget=budget)
                        continue
                    # Weighted by the table (the library refuses none), at each exponent of the sweep.
                    weighted = Budget(budget.target, budget.ratio, table)
                    for e in args.exponents:
                        label = key if len(args.exponents) == 1 else f"{key}-{e:g}"
                        spec = spec.replace(channel_rank=LatencyWeighted(exponent=e))
                        models[label] = untrained_slim(dense, x, channels=spec, budget=weighted)
    macs = {k: count_flops(v, x).dense for k, v in models.items()}
    aligned = {k: sum(w % 8 == 0 for w in widths(v)) / len(widths(v)) for k, v in models.items()}
    res = benchmark(
        models,
        (3, size, size),
        batch_sizes=args.batch_sizes,
        dtypes=args.dtypes,
        device=args.device,
        backends=["eager", "inductor"] if args.compile else ["eager"],
        channels_last=args.channels_last,
        warmup=args.warmup,
        repeats=args.repeats,
        macs=macs,
        meta={"model": name, "input": size, "macs_ratio_target": args.macs_ratio},
    )
    res["macs"] = macs
    if table is not None:  # the table's prediction for each model's widths (groups are named by producer)
        res["latency_predicted_ms"] = {
            k: table.predict_ms({g: v.get_submodule(g).out_channels for g in table.groups})
            for k, v in models.items()
        }
        res["latency_table"] = {
            "path": str(args.latency_table),
            "meta": table.meta,
            "dense_ms": table.dense_ms,
        }
    res["share_of_conv_widths_multiple_of_8"] = aligned
    logging.info("%s done", name)
    return res


def markdown(payload: dict) -> str:
    lines = [
        "# Same MACs budget, widths rounded to a multiple of m",
        "",
        f"{payload['machine']}",
        "",
        f"UNTRAINED widths: Chase's final widths for a MACs budget of {payload['macs_ratio']} of the dense "
        "model (prune_skip, ERK-masked initial weights at d = 0.1), with channel_multiple m "
        "(`-score-per-cost`, `-normalized`, `-uniform`, `-latency-weighted`: channel_rank=score_per_cost, "
        "normalized, uniform, latency_weighted by the table named below; a trailing `-E`: built with the "
        "exponent E of the time per MAC instead of the library's "
        f"{payload.get('exponent', RANKINGS['latency_weighted'].exponent):g}"
        + (
            f"; `lat-`: a latency budget of {payload['latency_ratio']} instead, by the table named below"
            if "latency_ratio" in payload
            else ""
        )
        + "); speedup = "
        "images/s over the dense model's in the same configuration (alternating timings, median); share of "
        "the MACs' speedup = speedup x MACs ratio (1.0: the time fell as much as the MACs).",
        "",
    ]
    for name, res in payload["models"].items():
        predicted = res.get("latency_predicted_ms", {})
        lines += [f"## {name}", ""]
        header, rule = "| model | MACs ratio | conv widths % 8 == 0 |", "|---|---|---|"
        if predicted:
            t = res["latency_table"]
            lines += [
                f"Latency table `{t['path']}`: {t['meta'].get('device')}, {t['meta'].get('dtype')}, batch "
                f"{t['meta'].get('batch_size')}, eager, dense {t['dense_ms']:.0f} ms "
                f"({t['meta'].get('method', 'whole forwards')}).",
                "",
            ]
            header, rule = header + " table's predicted speedup |", rule + "---|"
        lines += [header, rule]
        for k, v in res["macs"].items():
            share = res["share_of_conv_widths_multiple_of_8"][k]
            row = f"| {k} | {v / res['macs']['dense']:.3f} | {100 * share:.0f}% |"
            if predicted:
                row += f" {predicted['dense'] / predicted[k]:.2f}x |"
            lines.append(row)
        lines += [
            "",
            "| model | batch | dtype | channels_last | compiled | images/s | speedup "
            "| share of the MACs' speedup |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["results"]:
            ratio, speedup = res["macs"][r["model"]] / res["macs"]["dense"], r.get("speedup", 1.0)
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['dtype']} | {r['channels_last']} "
                f"| {r['compiled']} | "
                f"{r['throughput']:.1f} | {speedup:.2f}x | {speedup * ratio:.2f} |"
            )
        for s in res.get("skipped", []):
            lines.append(f"\nskipped: {s}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,cifar_resnet18")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--multiples", default="1,8,16")
    ap.add_argument("--ranks", default="score", help="channel_rank values, comma-separated")
    ap.add_argument(
        "--latency-table", default="", help="the table of latency_weighted and of --latency-ratio (one model)"
    )
    ap.add_argument("--latency-ratio", type=float, help="also prune to this latency budget by the table")
    ap.add_argument(
        "--exponents",
        default=str(RANKINGS["latency_weighted"].exponent),
        help="latency_weighted: the exponents of the time per MAC to build widths with, comma-separated "
        "(LatencyWeighted(exponent=e); default: the library's)",
    )
    ap.add_argument("--macs-ratio", type=float, default=0.6)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument(
        "--channels-last", choices=("no", "yes", "both"), default="no", help="memory format of models, inputs"
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--input", type=int, default=0, help="input size override (0: the model's)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="channel_multiple_cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch_sizes, args.compile, args.repeats, args.warmup = (
            "cifar_resnet18",
            "2",
            False,
            2,
            1,
        )
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.multiples = [int(m) for m in args.multiples.split(",")]
    args.ranks = args.ranks.split(",")
    args.exponents = [float(e) for e in args.exponents.split(",")]
    args.channels_last = {"no": [False], "yes": [True], "both": [False, True]}[args.channels_last]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    payload = {"machine": machine(args.device), "macs_ratio": args.macs_ratio, "models": {}}
    payload["exponent"] = RANKINGS["latency_weighted"].exponent  # the library's, which --exponents replaces
    if args.latency_table and args.latency_ratio is not None:
        payload["latency_ratio"] = args.latency_ratio
    for name in args.models.split(","):
        payload["models"][name] = run(name, args)
        write(args.stem, payload, markdown(payload), folder=Path(args.out))  # partial results as it goes
    print(markdown(payload))


if __name__ == "__main__":
    main()
