"""``chase bench``: throughput and latency of dense vs slim models, a table and JSON."""

from __future__ import annotations

import argparse
import logging
import pathlib
from typing import Any, Optional

log = logging.getLogger(__name__)

NAME = "bench"
LOG_PROGRESS = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import add_model_args, nonnegative_int, positive_int, positive_ints

    p = sub.add_parser(
        NAME,
        help="throughput and latency of dense vs slim models",
        description="Time dense vs slim inference (median after warm-up, CUDA synchronised) over batch "
        "sizes, dtypes, layouts and eager/compiled; print a table with the realised speedup next to the "
        "FLOPs ratio and write JSON (--json, or bench.json in the run folder). Unsupported combinations "
        "are skipped with a note.",
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
        "--compile",
        action="store_true",
        help="also time torch.compile'd models (Inductor, inference freezing)",
    )
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed forwards first (3)")
    p.add_argument(
        "--repeats", type=positive_int, default=10, help="timed forwards; the median is reported (10)"
    )
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads for CPU runs")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export dense and slim to ONNX, check them with onnxruntime and time them on the CPU "
        "next to PyTorch (fp32 only; with as many threads as PyTorch; needs chase-dst[onnx])",
    )


def run(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from chase.bench import DTYPES, benchmark, format_table
    from chase.cli.common import (
        CommandError,
        example_input,
        models_to_measure,
        refuse_overwriting,
        write_json,
    )
    from chase.flops import count_flops

    refuse_overwriting(args.json, args.source, args.slim_from)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda but CUDA is not available")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise CommandError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    # A full sweep to 256 takes minutes per model on a small CPU.
    default = [1, 8, 32, 64, 128, 256] if device.startswith("cuda") else [1, 8, 32]
    batches = args.batch_sizes or default
    dense, slim, run, what = models_to_measure(args)
    x = example_input(run, args)
    models = {"dense": dense} if slim is None else {"dense": dense, "slim": slim}
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    if slim is None:
        log.warning("no slim model (give a Chase checkpoint or --channel-sparsity): timing dense only")
    onnx: Optional[dict[str, pathlib.Path]] = None
    checks: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chase-onnx-") as tmp:  # the files live as long as the timing
        if args.onnx:
            onnx, checks, failed = _onnx_files(models, x, device, dtypes, pathlib.Path(tmp))
        result = benchmark(
            models,
            tuple(x.shape[1:]),
            batch_sizes=batches,
            dtypes=dtypes,
            device=device,
            channels_last={"off": [False], "on": [True], "both": [False, True]}[args.channels_last],
            compiled=[False, True] if args.compile else [False],
            warmup=args.warmup,
            repeats=args.repeats,
            macs=macs,
            meta={"model": run.model_name if run else args.model, "slim": what or None},
            onnx=onnx,
        )
    if args.onnx:
        result["meta"]["onnx_check"] = checks
        result["skipped"] += failed
    print(format_table(result))
    for label, c in checks.items():
        print(
            f"onnxruntime check of {label}: max |onnxruntime - torch| {c['max_abs_diff']:.3g} "
            f"(largest |output| {c['max_abs_output']:.3g}) at batch sizes {c['batch_sizes']}"
        )
    out = args.json or (run.folder / "bench.json" if run else None)
    if out:
        write_json(result, out)
    return 0


def _onnx_files(
    models: dict[str, Any], x: Any, device: str, dtypes: list[str], folder: pathlib.Path
) -> tuple[dict[str, pathlib.Path], dict[str, Any], list[dict[str, Any]]]:
    """Export every model to ONNX in ``folder`` and check it with onnxruntime, when some configuration
    will time it (fp32 on the CPU). Returns ({label: file}, {label: check result}, skip notes of models
    that failed to export or to match PyTorch: those are not timed, never timed wrong)."""
    import torch

    from chase.onnx import check_onnx, export_onnx

    if torch.device(device).type != "cpu" or "fp32" not in dtypes:
        return {}, {}, []  # benchmark() records why for each configuration
    files, checks, failed = {}, {}, []
    example = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    for label, model in models.items():
        path = folder / f"{label}.onnx"
        try:
            export_onnx(model, example, path)
            checks[label] = check_onnx(path, model, example)
            del checks[label]["path"]  # a temporary file
        except ModuleNotFoundError:
            raise  # an optional package to install: the command's error
        except Exception as e:  # an export or check failure: record it, time the rest
            reason = f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            failed.append(
                {
                    "dtype": "fp32",
                    "channels_last": False,
                    "compiled": False,
                    "backend": "onnxruntime",
                    "reason": reason,
                }
            )
            log.warning("onnxruntime rows of %s", reason)
            continue
        files[label] = path
        log.info("ONNX %s: max |onnxruntime - torch| %.3g", label, checks[label]["max_abs_diff"])
    return files, checks, failed
