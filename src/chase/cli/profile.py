"""``chase profile``: measure a latency table (or a roofline device file) for a latency budget, on the device
it will run on."""

from __future__ import annotations

import argparse

NAME = "profile"
LOG_PROGRESS = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import add_size_args, add_spec_args, positive_int

    p = sub.add_parser(
        NAME,
        help="measure how a model's forward time depends on each channel group's width (for target=latency "
        "and channel_rank=latency_weighted)",
        description="Time the model dense and with each prunable channel group alone narrowed to a few "
        "widths, on the device, dtype and batch size given, and write the table as JSON. Chase's "
        "target=latency (latency_ratio, latency_table) then prunes by predicted time, and "
        "channel_rank=latency_weighted takes more of a budget from the groups slow for what they cost.",
    )
    p.add_argument("--model", "-m", help="a chase.models name (required, but with --roofline)")
    p.add_argument(
        "--roofline",
        action="store_true",
        help="measure this device's roofline instead (a convolution's FLOP/s, a large add's bandwidth, a "
        "tiny op's overhead, at --dtype): the file is a roofline device for budgets (--roofline FILE, "
        "roofline: FILE)",
    )
    add_size_args(p)
    p.add_argument("--batch", type=positive_int, default=32, help="batch size timed (32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the dtype timed (fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last inputs and weights")
    p.add_argument(
        "--backend",
        default="eager",
        help="time the model as it will be served (chase.deploy): eager (module self times), inductor "
        "(compiled with freezing; on CUDA max-autotune with CUDA graphs up to batch 32), onnxruntime, "
        "openvino: the whole forward of each narrowed model, alternately with the dense one",
    )
    add_spec_args(p.add_argument_group("the channel groups profiled (as Chase's)"), ("groups",))
    p.add_argument(
        "--fractions", default="0.25,0.5,0.75", help="widths measured, as fractions (0.25,0.5,0.75)"
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed forwards per point (median)")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads for a CPU profile")
    p.add_argument("--out", "-o", required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from chase.cli.args import device_arg, given_spec_args
    from chase.cli.common import CommandError, claim_output
    from chase.models import get_model
    from chase.profile import profile_latency
    from chase.sparsifier.specs import ChannelSpec

    claim_output(args.out, overwrite=args.overwrite)  # before minutes of timing
    args.device = device_arg(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.roofline:
        if args.model:  # a roofline is the device's, whatever runs on it
            raise CommandError("--roofline measures the device, not a model: drop --model")
        return _roofline(args)
    if not args.model:
        raise CommandError("give --model (or --roofline to measure the device)")
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise CommandError(f"--fractions expects comma-separated numbers, got {args.fractions!r}") from None
    model = get_model(args.model, num_classes=args.num_classes)
    x = torch.randn(args.batch, 3, args.input, args.input, device=args.device)
    table = profile_latency(
        model,
        x,
        ChannelSpec(**given_spec_args(args, ("groups",))),
        fractions=fractions,
        dtype=args.dtype,
        channels_last=args.channels_last,
        repeats=args.repeats,
        meta={"model": args.model},
        backend=args.backend,
    )
    table.save(args.out)
    print(
        f"wrote {args.out}: {args.model} dense {table.dense_ms:.2f} ms per batch of {args.batch} "
        f"({args.dtype}, {args.device}); {len(table.groups)} channel groups"
    )
    return 0


def _roofline(args: argparse.Namespace) -> int:
    """``chase profile --roofline``: measure this device and write its roofline."""
    import dataclasses
    import json

    from chase.io import atomic_write_text
    from chase.sparsifier.roofline import measure_device

    device = measure_device(args.device, args.dtype, repeats=max(args.repeats, 10))
    atomic_write_text(args.out, json.dumps({"device": dataclasses.asdict(device)}, indent=2) + "\n")
    print(
        f"wrote {args.out}: {device.name} ({args.dtype}) conv {device.flops / 1e9:.1f} GFLOP/s, "
        f"bandwidth {device.bandwidth / 1e9:.1f} GB/s, per-op overhead {device.launch_eager * 1e6:.1f} us, "
        f"channel tile {device.tile}; "
        f"use it as --roofline {args.out} or roofline: {args.out}"
    )
    return 0
