"""torch.compile across Chase's channel events: how many compiles, and how long they take.

A Chase run of CIFAR ResNet-20 in a plain loop under ``torch.compile`` (Inductor), recompiled after every
event that changed shapes (``torch._dynamo.reset()`` first, as the trainer does), with ``channel_multiple``
1 and 8. Each step is timed; a step that compiled is one whose time exceeds 3x the median step, and its
excess over the median is counted as compile time.

    python benchmarks/compile_events.py                 # this CPU
    python benchmarks/compile_events.py --quick         # smoke test (eager backend)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch._dynamo.utils import counters

import chase
from chase.models import get_model
from common import machine, write


def run(multiple: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = get_model("cifar_resnet20", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = chase.Chase(
            model, opt, density=0.1, total_steps=args.steps, example_inputs=x[:1], update_every=8,
            channels=chase.ChannelSpec(
                channel_every=args.channel_every, channel_sparsity=0.5, channel_multiple=multiple
            ),
        )  # fmt: skip

    def compiled():
        torch._dynamo.reset()
        return torch.compile(model, backend=args.backend)

    counters.clear()
    fwd, times, events = compiled(), [], 0
    for _ in range(args.steps):
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(fwd(x), y).backward()
        opt.step()
        info = sp.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        if info.shapes_changed:
            events += 1
            fwd = compiled()
    median = statistics.median(times)
    slow = [s for s in times if s > 3 * median]
    return {
        "channel_multiple": multiple,
        "steps": args.steps,
        "shape_changes": events,
        "dynamo_frames": dict(counters["frames"]),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "compiling_steps": len(slow),
        "compile_seconds": sum(s - median for s in slow),
        "median_step_s": median,
        "widths": [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channel-every", type=int, default=8)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.backend = 24, 4, "eager"
    rows = [run(m, args) for m in (1, 8)]
    payload = {"machine": machine("cpu"), "backend": args.backend, "batch": args.batch, "rows": rows}
    lines = [
        "# torch.compile across Chase's channel events",
        "",
        f"{payload['machine']}",
        "",
        f"CIFAR ResNet-20, batch {args.batch}, {args.steps} steps, a channel event every "
        f"{args.channel_every} steps, backend {args.backend}; recompiled (after torch._dynamo.reset()) at "
        "each shape change.",
        "",
        "| channel_multiple | shape changes | Dynamo frames ok/total | compiling steps | compile s "
        "| median step s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["dynamo_frames"]
        lines.append(
            f"| {r['channel_multiple']} | {r['shape_changes']} | {f.get('ok', 0)}/{f.get('total', 0)} | "
            f"{r['compiling_steps']} | {r['compile_seconds']:.1f} | {r['median_step_s']:.3f} |"
        )
    md = "\n".join(lines) + "\n"
    if not args.quick:
        write("compile_events_cpu", payload, md)
    print(md)


if __name__ == "__main__":
    main()
