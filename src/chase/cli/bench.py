"""``chase bench``: throughput and latency of dense vs slim models, a table and JSON."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

NAME = "bench"
LOG_PROGRESS = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import add_model_args, nonnegative_int, positive_int, positive_ints

    p = sub.add_parser(
        NAME,
        help="throughput and latency of dense vs slim models",
        description="Time dense vs slim inference (median after warm-up, CUDA synchronised) over batch "
        "sizes, dtypes, layouts and backends, each model deployed as it would be served (chase.deploy: "
        "BatchNorm folded, outputs checked against eager); print a table with the realised speedup and "
        "its spread next to the FLOPs ratio and write JSON (--out, or bench.json in the run folder). "
        "Unsupported combinations are skipped with a note.",
    )
    add_model_args(p, "a Chase run folder or checkpoint: its exported model is the slim one")
    p.add_argument("--slim-from", metavar="CHECKPOINT", help="same as the positional run/checkpoint")
    p.add_argument(
        "--batch-sizes", type=positive_ints, help="comma-separated (default 1,8,32 on CPU; up to 256 on CUDA)"
    )
    p.add_argument("--dtypes", default="fp32", help="comma-separated from fp32,bf16,fp16 (default fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--channels-last", choices=("off", "on", "both"), default="off", help="memory format")
    p.add_argument(
        "--backend",
        default="eager",
        help="comma-separated backends the models are deployed under (chase.deploy): eager, inductor "
        "(torch.compile with freezing; on CUDA max-autotune, CUDA graphs up to batch 32), onnxruntime, "
        "openvino (CPU); dense and slim run under each (default eager)",
    )
    p.add_argument("--compile", action="store_true", help="deprecated: --backend eager,inductor")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed forwards first (3)")
    p.add_argument(
        "--repeats", type=positive_int, default=10, help="timed forwards; the median is reported (10)"
    )
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads for CPU runs")
    p.add_argument("--onnx", action="store_true", help="deprecated: add onnxruntime to --backend")


def run(args: argparse.Namespace) -> int:
    import torch

    from chase.bench import DTYPES, benchmark, format_table
    from chase.cli.args import device_arg
    from chase.cli.common import (
        CommandError,
        claim_output,
        example_input,
        models_to_measure,
        write_json,
    )
    from chase.deploy import BACKENDS
    from chase.flops import count_flops

    claim_output(args.out, args.source, args.slim_from, overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_arg(args.device)
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise CommandError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for flag, extra in (("--compile", "inductor"), ("--onnx", "onnxruntime")):
        if getattr(args, flag[2:]):
            log.warning("%s is deprecated: give --backend %s", flag, ",".join([*backends, extra]))
            backends += [extra] if extra not in backends else []
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        what = (
            f"unknown backend {unknown[0]!r}" if unknown else f"--backend {args.backend!r} names no backend"
        )
        raise CommandError(f"{what}; choose from {', '.join(BACKENDS)}")
    # A full sweep to 256 takes minutes per model on a small CPU.
    default = [1, 8, 32, 64, 128, 256] if device.startswith("cuda") else [1, 8, 32]
    batches = args.batch_sizes or default
    dense, slim, run, what = models_to_measure(args)
    x = example_input(run, args)
    models = {"dense": dense} if slim is None else {"dense": dense, "slim": slim}
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    if slim is None:
        log.warning("no slim model (give a Chase checkpoint or --channel-sparsity): timing dense only")
    result = benchmark(
        models,
        tuple(x.shape[1:]),
        batch_sizes=batches,
        dtypes=dtypes,
        device=device,
        channels_last={"off": [False], "on": [True], "both": [False, True]}[args.channels_last],
        backends=backends,
        warmup=args.warmup,
        repeats=args.repeats,
        macs=macs,
        meta={"model": run.model_name if run else args.model, "slim": what or None},
    )
    if what:
        print(f"slim = {what}")
    print(format_table(result))
    out = args.out or (run.folder / "bench.json" if run else None)
    if out:
        claim_output(out, args.source, args.slim_from, overwrite=args.overwrite, default=not args.out)
        write_json(result, out)
    return 0
