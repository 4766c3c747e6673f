"""``chase export``: the exported model file of a training checkpoint (and optionally ONNX)."""

from __future__ import annotations

import argparse
import pathlib

NAME = "export"
LOG_PROGRESS = True


def add_parser(sub: argparse._SubParsersAction) -> None:
    from chase.cli.args import _Deprecated

    p = sub.add_parser(
        NAME,
        help="write the exported (slim) model of a training checkpoint",
        description="Rebuild the model from a checkpoint's config and write the exported model as a slim "
        "checkpoint (Chase: channels sliced out; other methods: the masked weights); load it with "
        "chase.load_slim.",
    )
    p.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    p.add_argument(
        "--format",
        "-f",
        choices=("pt", "hf-dir", "onnx", "pt2"),
        default="pt",
        help="pt: slim checkpoint for chase.load_slim (default); hf-dir: a folder with model.safetensors, "
        "config.json and a model card for chase.from_pretrained; onnx: checked with onnxruntime; pt2: a "
        "torch.export program",
    )
    p.add_argument(
        "--out",
        "-o",
        help="output file or folder (default next to the checkpoint: slim.pt, hf/, slim.onnx, slim.pt2)",
    )
    p.add_argument("--output", dest="out", action=_Deprecated, new="--out", help="same as --out")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (the default one next to the checkpoint is always regenerated)",
    )
    p.add_argument(
        "--onnx",
        nargs="?",
        const="",
        metavar="PATH",
        help="deprecated (a second export: --format onnx): also write the exported model as ONNX and check "
        "it against PyTorch with onnxruntime",
    )
    p.add_argument(
        "--optimize",
        action="store_true",
        help="onnx and pt2: export the graph chase.deploy serves (BatchNorm folded into the convolutions, "
        "checked against the model)",
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from chase.cli.common import CommandError, claim_output
    from chase.train.checkpoint import load_checkpoint
    from chase.train.export import export_checkpoint

    path = pathlib.Path(args.checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CommandError(f"{path} does not exist")
    default = {"pt": "slim.pt", "hf-dir": "hf", "onnx": "slim.onnx", "pt2": "slim.pt2"}[args.format]
    out = pathlib.Path(args.out) if args.out else path.with_name(default)
    if args.onnx is not None:
        logging.getLogger("chase.cli").warning("--onnx is deprecated: run a second export with --format onnx")
    onnx = None if args.onnx is None else pathlib.Path(args.onnx or out.with_suffix(".onnx"))
    load_checkpoint(path)  # say what a wrong input is before looking at the output
    if args.format == "pt2" and out.suffix != ".pt2":
        raise CommandError(f"a torch.export program is a .pt2 file: {out} (torch.export.load expects it)")
    if args.format == "hf-dir" and out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise CommandError(f"{out} holds other files: give a new or empty folder (or an earlier export)")
    claim_output(out, path, folder=args.format == "hf-dir", overwrite=args.overwrite, default=not args.out)
    claim_output(onnx, path, out, overwrite=args.overwrite, default=not args.onnx)
    meta = export_checkpoint(path, out, format=args.format, onnx=onnx, optimize=args.optimize)
    load = {
        "pt": f"chase.load_slim(get_model({meta['model']!r}, num_classes={meta['num_classes']}), "
        f"{str(out)!r}) after `import chase; from chase.models import get_model`",
        "hf-dir": f"chase.from_pretrained({str(out)!r})",
        "onnx": "onnxruntime.InferenceSession(...)",
        "pt2": f"torch.export.load({str(out)!r}).module()",
    }[args.format]
    print(f"wrote {out} ({meta['model']}, {meta['method']}); load it with {load}")
    if "deploy" in meta:
        d = meta["deploy"]
        print(
            f"optimized: BatchNorm {d['batchnorm']}; outputs within {d['max_relative_diff']:.2g} of the model"
        )
    if args.format == "onnx":
        onnx = out
    if onnx is not None:
        c = meta["onnx"]
        print(
            f"wrote {onnx}; onnxruntime {c['onnxruntime']} matches PyTorch at batch sizes "
            f"{c['batch_sizes']}: "
            f"max |diff| {c['max_abs_diff']:.3g}, largest |output| {c['max_abs_output']:.3g} "
            f"(relative {c['relative_diff']:.2g}, allowed {c['atol']:g} + {c['rtol']:g} x largest)"
        )
    return 0
