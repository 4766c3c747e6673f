"""Does a narrower ResNet-50 run faster, and does it matter whether its widths are multiples of 8?

A diagnostic for "smaller but not faster" (the first H200 run: Chase's untrained S_c 0.4 widths ran at
0.9-1.07x the dense ResNet-50 although the FLOPs allow 1.8x). Two families of models, timed alternately
in one ``chase.bench.benchmark`` call per configuration:

- torchvision ResNet-50 with a uniform inner bottleneck width ``width_per_group`` = 64 (dense), 48, 40,
  39, 37, 32: the same network shape at nearly equal FLOPs, with inner widths that are or are not
  multiples of 8 (40 -> 40/80/160/320 channels; 39 -> 39/78/156/312; 37 -> 37/74/148/296).
- Chase's widths for S_c 0.4 with prune_skip, chosen at initialisation (``untrained_slim``), as they come
  (most widths odd) and rounded DOWN to a multiple of 8 per channel group (the lowest-UMM channels of each
  group removed until its width is a multiple; a group narrower than 8 keeps its width). The rounding is
  done here, after the fact, for the diagnosis only; it removes a few more channels (see the FLOPs ratio).

    python benchmarks/alignment.py --device cuda --dtypes fp32,bf16 --batch-sizes 64,256   # the GPU run
    python benchmarks/alignment.py --quick                                                   # CPU smoke
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

import chase
from chase import count_flops
from chase.bench import benchmark
from chase.sparsifier import Chase
from chase.surgery import remove_channels
from common import RESULTS, machine, write

UNIFORM = (48, 40, 39, 37, 32)


def uniform_resnet50(width_per_group: int) -> nn.Module:
    """torchvision's ResNet-50 with every bottleneck's inner width scaled by ``width_per_group / 64``."""
    return torchvision.models.ResNet(
        torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], width_per_group=width_per_group
    )


def chase_widths(dense: nn.Module, x: torch.Tensor, s: float, multiple: int) -> nn.Module:
    """Chase's untrained final widths for S_c ``s`` with prune_skip, each group then rounded down to a
    multiple of ``multiple`` (1: as they come) by removing its lowest-UMM channels."""
    import copy

    work = copy.deepcopy(dense)
    opt = torch.optim.SGD(work.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = Chase(
            work, opt, density=0.1, soft_bound=0.0, total_steps=6, example_inputs=x, update_every=2,
            channels=chase.ChannelSpec(channel_sparsity=s, prune_skip=True, channel_every=1, channel_end=2),
        )  # fmt: skip
    sp.remove_channels_now(sp.last_event)
    if multiple > 1:
        scores, _, ids = sp._scores()  # alive channels of every group, in group order
        removals, start = {}, 0
        for g, alive in zip(sp.groups, ids):
            width = alive.numel()
            extra = width % multiple if width > multiple else 0
            if extra:
                order = scores[start : start + width].float().cpu().argsort()
                removals[g.name] = alive[order[:extra]]
            start += width
        masks = {n: m.clone() for n, m in sp._masks.masks.items()}
        remove_channels(sp.module, sp._surgery, removals, optimizer=opt, masks=masks)
        sp._masks.rebuild(masks)
    return sp.export().eval()


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def markdown(p: dict) -> str:
    m = p["machine"]
    lines = [
        f"# Width alignment on {m.get('gpu', m['cpu'])} (torch {m['torch']}, {m['date']})",
        "",
        f"ResNet-50 at {p['input']}x{p['input']}, eager, median of {p['repeats']} forwards after "
        f"{p['warmup']} warm-up, all models of a configuration timed alternately. speedup = images/s over "
        "the dense model's; FLOPs-implied = dense MACs / model MACs; widths %8==0 = share of the conv "
        "output widths that are multiples of 8.",
        "",
        "| model | MACs ratio | widths %8==0 | dtype | channels_last | batch | images/s | speedup | "
        "FLOPs-implied |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    info = p["models"]
    for r in p["bench"]["results"]:
        k = r["model"]
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        fr = f"{r['flops_ratio']:.2f}x" if "flops_ratio" in r else ""
        lines.append(
            f"| {k} | {info[k]['macs_ratio']:.3f} | {100 * info[k]['aligned8']:.0f}% | {r['dtype']} | "
            f"{r['channels_last']} | {r['batch_size']} | {r['throughput']:.0f} | {sp} | {fr} |"
        )
    for s in p["bench"]["skipped"]:
        lines.append(f"\nskipped: {s}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--batch-sizes", default="32")
    ap.add_argument("--layouts", default="channels_last,contiguous")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--input", type=int, default=224)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="alignment")
    ap.add_argument("--quick", action="store_true", help="64x64 input, batch 2, 2 repeats (smoke test)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.input, args.batch_sizes, args.repeats, args.warmup = 64, "2", 2, 1
        args.stem = args.stem + "_quick"
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    torch.manual_seed(0)
    x = torch.zeros(1, 3, args.input, args.input)
    dense = torchvision.models.resnet50().eval()
    models = {"dense": dense}
    for w in UNIFORM:
        models[f"uniform_w{w}"] = uniform_resnet50(w).eval()
    models["chase0.4_skip"] = chase_widths(dense, x, 0.4, 1)
    models["chase0.4_skip_r8"] = chase_widths(dense, x, 0.4, 8)
    macs = {k: count_flops(m, x).dense for k, m in models.items()}
    info = {}
    for k, m in models.items():
        ws = widths(m)
        info[k] = {
            "macs": macs[k],
            "macs_ratio": macs[k] / macs["dense"],
            "aligned8": sum(w % 8 == 0 for w in ws) / len(ws),
            "widths": ws,
        }
        print(
            f"{k}: MACs {info[k]['macs_ratio']:.3f}x dense, {100 * info[k]['aligned8']:.0f}% of widths %8==0"
        )
    layouts = {"channels_last": True, "contiguous": False}
    res = benchmark(
        models,
        (3, args.input, args.input),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        dtypes=args.dtypes.split(","),
        device=dev,
        channels_last=[layouts[v] for v in args.layouts.split(",")],
        warmup=args.warmup,
        repeats=args.repeats,
        macs=macs,
    )
    payload = {
        "machine": machine(str(dev)),
        "input": args.input,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "models": info,
        "bench": res,
    }
    write(args.stem, payload, markdown(payload), folder=Path(args.out))
    print(markdown(payload))


if __name__ == "__main__":
    main()
