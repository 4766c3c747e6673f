"""Cost of Chase's channel machinery on the CPU: one channel event, and the training step it buys.

1. One channel event (score every prunable channel by UMM, water-fill the quota, slice producers, norms,
   consumers, masks and SGD momentum): median over consecutive events of a realistic schedule, for
   ResNet-50 (224) and the CIFAR VGG-19-BN. Targets: < 0.8 s and < 0.5 s.
2. A training step (forward + backward + SGD step, batch 32, 224x224) of ResNet-50 dense, then of the
   same model after Chase removed 50% of all prunable channels with prune_skip on; same process, same
   run. Target: slim step <= 0.6 x dense step.

    python benchmarks/channel_event.py            # writes results/channel_event.{json,md}
    python benchmarks/channel_event.py --quick    # seconds, tiny models (results/channel_event_quick.*)
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
from torch import nn

import chase
from chase.models import get_model
from common import machine, timeit, write

EVENT_TARGET_S = {"resnet50": 0.8, "cifar_vgg19_bn": 0.5}
STEP_RATIO_TARGET = 0.6


def _train_step(model, opt, x, y):
    def run():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return run


def _make_chase(model: nn.Module, opt: torch.optim.Optimizer, size: int, **options) -> chase.Chase:
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # schedules shorter than the defaults warn; events are triggered by hand
        return chase.Chase(model, opt, density=0.1, example_inputs=torch.randn(1, 3, size, size), **options)


def event_time(name: str, size: int, prune_skip: bool, events: int) -> dict:
    """Median time of ``events`` consecutive channel events (after one training step, so momentum exists)."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=10 if name.startswith("cifar_") else 1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # The ImageNet recipe's shape: 40 events (every 2000 steps) up to T_chan = 80% of training.
    sp = _make_chase(
        model,
        opt,
        size,
        total_steps=100_000,
        channels=chase.ChannelSpec(channel_sparsity=0.4, channel_every=2000, prune_skip=prune_skip),
    )
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))
    _train_step(model, opt, x, y)()
    steps = [sp.channel_offset + k * sp.channel_every for k in range(1, events + 1)]
    times, removed = [], []
    for t in steps:  # each event is timed once: it changes the model, so it cannot be repeated
        t0 = time.perf_counter()
        removed.append(sp.remove_channels_now(t))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "model": name,
        "input": size,
        "prune_skip": prune_skip,
        "events": len(steps),
        "median_s": times[len(times) // 2],
        "max_s": times[-1],
        "channels_removed": removed,
        "prunable_channels": sp.total_channels,
        "target_s": EVENT_TARGET_S.get(name),
    }


def step_ratio(name: str, size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = get_model(name, num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    dense = timeit(_train_step(model, opt, x, y), repeats=repeats)
    sp = _make_chase(
        model,
        opt,
        size,
        total_steps=10,
        channels=chase.ChannelSpec(
            channel_sparsity=0.5, min_channel_ratio=0.2, prune_skip=True, channel_every=2
        ),
        update_every=2,
    )
    sp.remove_channels_now(sp.last_event)
    sp.remove()  # time the narrower network alone (the mask post-hook is measured in overhead.py)
    slim = timeit(_train_step(model, opt, x, y), repeats=repeats)
    return {
        "model": name,
        "input": size,
        "batch": batch,
        "dtype": "float32",
        "dense_step_s": dense,
        "slim_step_s": slim,
        "ratio": slim / dense,
        "channel_sparsity": sp.channel_sparsity_now(),
        "params_dense": sum(sp.dense_numel.values()),
        "alive_channels": sum(sp.alive_channels().values()),
        "prunable_channels": sp.total_channels,
        "target_ratio": STEP_RATIO_TARGET,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, seconds (smoke test)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        cases, step_case, events = [("cifar_resnet20", 32)], ("resnet18", 64, 2), 2
    else:
        cases, step_case, events = [("resnet50", 224), ("cifar_vgg19_bn", 32)], ("resnet50", 224, 32), 5
    results = {"machine": machine(), "events": [], "step": None}
    for name, size in cases:
        for skip in (False, True):
            r = event_time(name, size, skip, events)
            results["events"].append(r)
            print(
                f"{name} prune_skip={skip}: channel event median {r['median_s']:.3f} s (max {r['max_s']:.3f})"
            )
    results["step"] = r = step_ratio(*step_case, repeats=args.repeats)
    print(
        f"{r['model']} train step b{r['batch']}: dense {r['dense_step_s']:.2f} s, 50% channels removed "
        f"{r['slim_step_s']:.2f} s -> {r['ratio']:.2f}x"
    )
    m = results["machine"]
    lines = [
        f"# Channel machinery cost ({m['cpu']}, {m['torch_threads']} threads, "
        f"torch {m['torch']}, {m['date']})",
        "",
        "| model | input | prune_skip | events | median s | max s | target s | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in results["events"]:
        ok = "" if e["target_s"] is None else ("yes" if e["median_s"] < e["target_s"] else "NO")
        lines.append(
            f"| {e['model']} | {e['input']} | {e['prune_skip']} | {e['events']} | {e['median_s']:.3f} | "
            f"{e['max_s']:.3f} | {e['target_s']} | {ok} |"
        )
    lines += [
        "",
        "| model | batch | dtype | dense step s | slim step s | ratio | target | pass |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['model']} {r['input']}px, {100 * r['channel_sparsity']:.0f}% channels removed (prune_skip) | "
        f"{r['batch']} | {r['dtype']} | {r['dense_step_s']:.2f} | {r['slim_step_s']:.2f} | "
        f"{r['ratio']:.2f} | "
        f"<= {STEP_RATIO_TARGET} | {'yes' if r['ratio'] <= STEP_RATIO_TARGET else 'NO'} |",
        "",
    ]
    write("channel_event_quick" if args.quick else "channel_event", results, "\n".join(lines))


if __name__ == "__main__":
    main()
