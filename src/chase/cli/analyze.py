"""``chase analyze``: per-channel density statistics and plots of a sparse run."""

from __future__ import annotations

import argparse
import pathlib

NAME = "analyze"
LOG_PROGRESS = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="per-channel density statistics and plots of a sparse checkpoint",
        description="Per-layer channel densities and the share of sparse amenable channels (chase."
        "channel_stats), printed, and a PNG histogram (channel_density.png in the run folder or --out).",
    )
    p.add_argument("source", help="a run folder or its checkpoint.pt")
    p.add_argument("--out", "-o", help="PNG file or folder (default: the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out's PNG files if they exist")
    p.add_argument(
        "--amenable-ratio",
        type=float,
        default=0.5,
        help="a channel is sparse amenable below this x its layer's density (0.5)",
    )


def run(args: argparse.Namespace) -> int:
    from chase.analysis import amenable_curve, channel_stats
    from chase.cli.common import CommandError, claim_output
    from chase.plots import plot_amenable_curve, plot_channel_densities
    from chase.train.export import load_run
    from chase.train.metrics import read_metrics

    if not 0.0 < args.amenable_ratio <= 1.0:
        raise CommandError(f"--amenable-ratio must be in (0, 1], got {args.amenable_ratio}")
    loaded = load_run(args.source)
    if loaded.sparsifier is None:
        raise CommandError(f"{loaded.path} is a dense run: it has no masks to analyse")
    stats = channel_stats(loaded.model, loaded.sparsifier, amenable_ratio=args.amenable_ratio)
    title = f"{loaded.model_name} ({loaded.method})"
    print(f"{title}, {loaded.path}")
    print(stats.summary())
    out = pathlib.Path(args.out) if args.out else loaded.folder / "channel_density.png"
    if out.suffix.lower() != ".png":
        if out.is_file():
            raise CommandError(f"--out {out} is a file: give a .png file name or a folder")
        out = out / "channel_density.png"
    for path in (out, out.with_name("amenable.png")):  # its own plots in the run folder it regenerates
        claim_output(path, args.source, overwrite=args.overwrite, default=not args.out)
    plot_channel_densities(stats, out, title=title)
    print(f"wrote {out}")
    curve = amenable_curve(read_metrics(loaded.folder))
    if curve:
        print(
            "amenable family over training (share of sparse conv channels below r x their layer's density):"
        )
        for r, points in curve.items():
            print(
                f"  r={r:g}: {100 * points[0][1]:.1f}% at step {points[0][0]} -> "
                f"{100 * points[-1][1]:.1f}% at step {points[-1][0]} ({len(points)} records)"
            )
        path = out.with_name("amenable.png")
        plot_amenable_curve(curve, path, title=title)
        print(f"wrote {path}")
    return 0
