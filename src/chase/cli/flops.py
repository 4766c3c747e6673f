"""``chase flops``: dense, sparse and GPU-supported (slim) MACs of a model or a run, with ratios."""

from __future__ import annotations

import argparse

NAME = "flops"
LOG_PROGRESS = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import add_model_args

    p = sub.add_parser(
        NAME,
        help="dense, sparse and GPU-supported (slim) MACs of a model or checkpoint",
        description="Multiply-accumulates of the Conv/Linear layers for one image at inference: dense, "
        "sparse (kept weights x output size) and GPU-supported (the slim model counted dense), with "
        "ratios to the dense model.",
    )
    add_model_args(p, "a run folder or its checkpoint.pt (instead of --model)")
    p.add_argument("--layers", action="store_true", help="print the per-layer table too")


def run(args: argparse.Namespace) -> int:
    from chase.cli.common import claim_output, example_input, models_to_measure, write_json
    from chase.flops import FlopReport, count_flops

    claim_output(args.out, args.source, overwrite=args.overwrite)
    dense, slim, run, what = models_to_measure(args)
    x = example_input(run, args)
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
    if args.out:
        gpu = slim_report.dense if slim_report else ref.dense
        write_json(
            {
                "model": name,
                "input": list(x.shape[1:]),
                "slim": what or None,
                "method": run.method if run else None,
                "dense": ref.dense,
                "sparse": sparse.sparse,
                "gpu_supported": gpu,
                "sparse_ratio": sparse.sparse / ref.dense,
                "gpu_supported_ratio": gpu / ref.dense,
                "layers": sparse.as_dict()["layers"],
                "slim_layers": slim_report.as_dict()["layers"] if slim_report else None,
            },
            args.out,
        )
    return 0
