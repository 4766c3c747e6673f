"""CIFAR-10 on one GPU: dense / RigL / Chase S_c 0.5 / Chase S_c 0.3 at density 0.1, then dense vs slim
throughput over batch sizes and dtypes. Built to finish inside ONE device call (at most 10 minutes).

Protocol: ``cifar_resnet18`` (3x3 stem, 10 classes), 20 epochs per method (``--fit-epochs``: as many as
fit, at most that), batch 512, SGD (momentum 0.9, Nesterov, weight decay 5e-4), peak LR 0.4 with a linear
warm-up over the first epoch and cosine decay to 0, random crop (4 px zero padding) + horizontal flip, bf16
autocast, channels_last, cuDNN autotuning off while training (Chase changes shapes at every event; all
methods train alike). Sparse methods use density 0.1 (ERK) with exploration every ``total_steps / 20``
steps: RigL (per layer, gradient growth, ends at 75% of the steps) and Chase (global MEST soft bound,
channel event every ``total_steps / 20`` steps up to T_chan = 80% of the steps, the paper's cubic channel
ramp, physical removal). The reported accuracy is the FINAL model's on the 10,000 test images (no
checkpoint selection); for Chase the exported slim model is evaluated too. The data pipeline is GPU
resident: every image is decoded once into a uint8 CUDA tensor, and crop, flip and normalisation run on
the GPU.

``--fit-epochs`` times a few dense training steps first and chooses the epochs so that every method runs
its whole schedule (every mask update and channel event) inside the budget.

Then ``chase.bench.benchmark`` times the trained dense model and both trained slim models alternately
(eager, channels_last, cuDNN autotuning on) at batch 1/32/256/1024 in fp32 and bf16, with the
GPU-supported FLOPs ratio (``chase.count_flops``) next to every realised speedup.

A time budget (``--budget-s``, default 480 s from start, data loading included) is checked before every
epoch: when the next epoch would not fit (keeping ``--bench-reserve-s`` for the throughput part), training
stops, the run is evaluated and marked ``truncated``, later methods are skipped, and the result files are
written with what was measured. Result files are also rewritten after every method, so even a killed call
leaves its finished runs behind.

The device call (``benchmarks/gpu_run.sh``) runs the CUDA tests, the ResNet-50 throughput
(``speedup.py``) and this script in one go; see that file.

CPU smoke test (tiny, under a minute; never write it into benchmarks/results):

    python benchmarks/gpu_cifar.py --device cpu --epochs 1 --limit-train 512 --limit-test 256 --quick \\
        --data-dir ../shared/data/cifar10 --out /tmp/gpu_cifar_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import pathlib
import time
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Subset

import chase
import common
from chase.bench import benchmark
from chase.models import get_model
from chase.train.data import EpochSampler
from chase.train.resident import ResidentLoader, dataset_tensors
from chase.train.seeds import epoch_seed

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
#: ``chase<S>``: Chase at S_c = S; ``chase_lat<R>``: Chase (prune_skip) to a latency budget of R predicted by
#: this GPU's roofline (fused, batch 256; chase.sparsifier.roofline), channels by score per predicted ms.
METHODS = ("dense", "rigl", "chase0.5", "chase0.3", "chase_lat0.5")
FIT_OVERHEAD = (
    1.3  # an estimate of a run's cost per epoch over the probed dense steps; the budget still guards
)


# --------------------------------------------------------------------------- data
def load_split(root: pathlib.Path, limit: Optional[int], seed: int, workers: int):
    """All images of an ImageFolder split (or a fixed random ``limit`` of them) as uint8 N x 3 x H x W
    and int64 labels, on the CPU."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root))
    if limit is not None and limit < len(ds):
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
        ds = Subset(ds, pick.tolist())
    x, y = dataset_tensors(ds, workers)
    return x, y, (ds.dataset if isinstance(ds, Subset) else ds).classes


def gpu_loader(x: torch.Tensor, y: torch.Tensor, dev: torch.device, bs: int, train: bool, seed: int):
    """The library's device-resident loader: uint8 images on ``dev``; crop, flip, normalise there."""
    sampler = EpochSampler(len(y), shuffle=train, seed=seed, pad=False)
    return ResidentLoader(x, y, sampler, bs, drop_last=train, augment=train, mean=MEAN, std=STD, device=dev)


# --------------------------------------------------------------------------- training
def _autocast(dev: torch.device, amp: bool):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)


@torch.inference_mode()
def evaluate(model: nn.Module, data: ResidentLoader, dev: torch.device, amp: bool, cl: bool) -> float:
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=dev)
    for x, y in data:
        with _autocast(dev, amp):
            correct += (model(_fmt(x, cl)).argmax(1) == y).sum()
    model.train(was)
    return correct.item() / len(data.labels)


def _fmt(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_sparsifier(method: str, model: nn.Module, opt, total: int, density: float, example: torch.Tensor):
    every = max(2, total // 20)
    with warnings.catch_warnings():  # short smoke-test schedules warn about their length
        warnings.simplefilter("ignore")
        if method == "dense":
            return None, {}
        if method == "rigl":
            opts = {"density": density, "total_steps": total, "update_every": every}
            return chase.RigL(model, opt, **opts), opts
        if method.startswith("chase_lat"):
            from gpu_deploy import device_roofline

            ratio = float(method[len("chase_lat") :])
            roof = device_roofline(example.device, "bf16" if example.device.type == "cuda" else "fp32", 256)
            opts = {
                "density": density,
                "total_steps": total,
                "update_every": every,
                "channels": chase.ChannelSpec(
                    channel_sparsity=0.5,
                    prune_skip=True,
                    channel_rank="score_per_cost",
                    channel_every=every,
                    channel_end=int(0.8 * total),
                ),
                "budget": chase.Budget.latency(ratio, roof),
            }
            return chase.Chase(model, opt, example_inputs=example, **opts), opts
        if method.startswith("chase"):
            opts = {
                "density": density,
                "total_steps": total,
                "update_every": every,
                "channels": chase.ChannelSpec(
                    channel_sparsity=float(method[len("chase") :]),
                    channel_every=every,
                    channel_end=int(0.8 * total),
                ),
            }
            return chase.Chase(model, opt, example_inputs=example, **opts), opts
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _plain(value: Any) -> Any:
    """An option as JSON: a spec's fields, a budget's description."""
    if isinstance(value, chase.Budget):
        return value.describe()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def train_one(
    method: str, args, train: ResidentLoader, test: ResidentLoader, dev, deadline: float, dense_macs: int
):
    torch.manual_seed(args.seed)
    model = get_model(args.model, num_classes=10).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    steps_per_epoch = len(train)  # drop_last
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch

    def lr_at(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    example = _fmt(test.images[:1].float(), args.channels_last)  # only shapes matter for the trace
    sp, sp_opts = make_sparsifier(method, model, opt, total, args.density, example)
    row: dict[str, Any] = {
        "method": method,
        "options": {k: _plain(v) for k, v in sp_opts.items()},
        "total_steps": total,
        "epochs_planned": args.epochs,
    }
    t0, epoch_s, epochs, truncated, losses = time.time(), 0.0, 0, False, []
    model.train()
    for epoch in range(args.epochs):
        if time.time() + epoch_s > deadline:
            truncated = True
            break
        te = time.time()
        train.sampler.set_epoch(epoch)
        train.generator.manual_seed(epoch_seed(args.seed, epoch))
        loss_sum = torch.zeros((), device=dev)
        for x, y in train:
            with _autocast(dev, args.amp):
                loss = nn.functional.cross_entropy(model(_fmt(x, args.channels_last)), y)
            loss.backward()
            opt.step()
            info = sp.step() if sp is not None else None  # after opt.step(), before zero_grad()
            opt.zero_grad(set_to_none=True)
            sched.step()
            loss_sum += loss.detach().float()
            if info is not None and info.shapes_changed and args.channels_last:
                model.to(memory_format=torch.channels_last)  # sliced weights come back contiguous
        losses.append(round(loss_sum.item() / steps_per_epoch, 4))  # the one sync per epoch
        epochs += 1
        epoch_s = time.time() - te
        print(
            f"  {method} epoch {epoch + 1}/{args.epochs}: loss {losses[-1]:.3f}, {epoch_s:.1f} s", flush=True
        )
    train_s = time.time() - t0
    acc = evaluate(model, test, dev, args.amp, args.channels_last)
    x1 = example
    row.update(
        epochs_done=epochs,
        truncated=truncated,
        train_s=round(train_s, 1),
        train_loss=losses,
        test_acc=acc,
        dense_macs=dense_macs,
    )
    slim = None
    if sp is None:
        row.update(sparse_macs=dense_macs, gpu_macs=dense_macs, density=1.0)
    else:
        rep = chase.count_flops(model, x1, sp.masks)
        row.update(sparse_macs=rep.sparse, density=sp.global_density())
        if sp.removes_channels:
            slim = sp.export().eval()
            row.update(
                gpu_macs=chase.count_flops(slim, x1).dense,
                channel_sparsity=sp.channel_sparsity_now(),
                slim_test_acc=evaluate(slim, test, dev, args.amp, args.channels_last),
                slim_params=sum(p.numel() for p in slim.parameters()),
            )
        else:  # unstructured: every channel stays, a GPU runs the dense shape
            row["gpu_macs"] = dense_macs
    row["sparse_ratio"] = row["sparse_macs"] / dense_macs
    row["gpu_ratio"] = row["gpu_macs"] / dense_macs
    print(
        f"{method}: test acc {100 * acc:.2f}% after {epochs} epochs ({train_s:.0f} s), "
        f"sparse MACs {row['sparse_ratio']:.3f}x, GPU-supported {row['gpu_ratio']:.3f}x",
        flush=True,
    )
    return row, model.eval(), slim


# --------------------------------------------------------------------------- report
def markdown(p: dict) -> str:
    m, a = p["machine"], p["args"]
    lines = [
        f"# CIFAR-10 on {m.get('gpu', m['device'])}: dense / RigL / Chase, then dense vs slim throughput",
        "",
        f"torch {m['torch']}, {m['date']}; {a['model']}, {a['epochs']} epochs planned, "
        f"batch {a['batch_size']}, "
        f"peak LR {a['lr']}, density {a['density']}, train dtype {'bf16 autocast' if a['amp'] else 'fp32'}, "
        f"channels_last {a['channels_last']}; train images {p['n_train']}, test images {p['n_test']}; "
        f"wall time {p['wall_s']:.0f} s of a {a['budget_s']} s budget (data loading {p['load_s']:.0f} s)"
        + ("; **stopped early by the time budget**" if p["budget_hit"] else "")
        + ".",
        "",
        *(
            [
                f"Epochs chosen by a probe before training: {1e3 * p['fit']['probe_step_s']:.1f} ms per "
                f"dense step -> {p['fit']['epochs']} epochs per method (cap {p['fit']['epochs_cap']}).",
                "",
            ]
            if p.get("fit")
            else []
        ),
        "Accuracy is the final model's on the test split. Sparse = kept weights x output positions; "
        "GPU-supported = the model as a GPU runs it (slim for Chase, full width for dense and RigL).",
        "",
        "| method | seed | epochs | test acc % | slim acc % | density | channel sparsity | "
        "sparse MACs (ratio) | GPU-supported MACs (ratio) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["runs"]:
        slim = f"{100 * r['slim_test_acc']:.2f}" if "slim_test_acc" in r else ""
        cs = f"{r['channel_sparsity']:.3f}" if "channel_sparsity" in r else ""
        lines.append(
            f"| {r['method']} | {r.get('seed', a['seed'])} | "
            f"{r['epochs_done']}{' (truncated)' if r['truncated'] else ''} | "
            f"{100 * r['test_acc']:.2f} | {slim} | {r['density']:.3f} | {cs} | "
            f"{r['sparse_macs'] / 1e6:.1f} M ({r['sparse_ratio']:.3f}) | "
            f"{r['gpu_macs'] / 1e6:.1f} M ({r['gpu_ratio']:.3f}) | {r['train_s']:.0f} |"
        )
    for s in p["skipped_methods"]:
        lines.append(f"| {s} | | not run: time budget | | | | | | | |")
    lines += summary(p["runs"])
    b = p.get("bench")
    if b:
        bm = b["meta"]
        lines += [
            "",
            f"Throughput ({bm['device_name']}, TF32 {'on' if bm.get('tf32') else 'off'}, channels_last, "
            f"median of {bm['repeats']} after {bm['warmup']} warm-up, each model deployed with chase.deploy "
            "and timed alternately with dense under the same backend; the trained models):",
            "",
            "| model | backend | dtype | batch | latency ms | images/s | speedup | (min-max) "
            "| FLOPs-implied |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in b["results"]:
            sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            spread = "{:.2f}-{:.2f}".format(*r["speedup_spread"]) if "speedup_spread" in r else ""
            fr = f"{r['flops_ratio']:.2f}x" if "flops_ratio" in r else ""
            lines.append(
                f"| {r['model']} | {r.get('backend', 'eager')} | {r['dtype']} | {r['batch_size']} | "
                f"{r['latency_ms']:.3f} | {r['throughput']:.0f} | {sp} | {spread} | {fr} |"
            )
        for s in b["skipped"]:
            lines.append(f"\nskipped: {s}")
    elif p.get("bench_note"):
        lines += ["", f"Throughput: {p['bench_note']}"]
    lines.append("")
    return "\n".join(lines)


def probe_step_s(args, train: ResidentLoader, dev: torch.device) -> float:
    """Seconds per dense training step (after warm-up), to size the run before it starts."""
    torch.manual_seed(args.seed)
    model = get_model(args.model, num_classes=10).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    times, it = [], iter(train)
    for i in range(min(len(train), 18)):
        x, y = next(it)
        if i == 3 and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.time()
        with _autocast(dev, args.amp):
            loss = nn.functional.cross_entropy(model(_fmt(x, args.channels_last)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    steady = times[3:] or times
    return sum(steady) / len(steady)


def fit_epochs(args, n_methods: int, steps_per_epoch: int, step_s: float, seconds: float) -> int:
    """The most epochs (at most ``args.epochs``, at least 1) for which ``n_methods`` runs fit in
    ``seconds``, with ``FIT_OVERHEAD`` for sparsifier steps, channel events, evaluation and export."""
    per_epoch = steps_per_epoch * step_s * FIT_OVERHEAD
    return max(1, min(args.epochs, int(seconds / (n_methods * per_epoch))))


def summary(runs: list[dict]) -> list[str]:
    """Mean and spread (min-max) of the test accuracy per method, when a method ran with several seeds."""
    by: dict[str, list[float]] = {}
    for r in runs:
        if not r["truncated"]:
            by.setdefault(r["method"], []).append(100 * r["test_acc"])
    if all(len(v) < 2 for v in by.values()):
        return []
    lines = ["", "| method | seeds | mean test acc % | min | max |", "|---|---|---|---|---|"]
    for m, v in by.items():
        lines.append(f"| {m} | {len(v)} | {sum(v) / len(v):.2f} | {min(v):.2f} | {max(v):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="CIFAR-10 in ImageFolder layout (train/, test/)")
    ap.add_argument("--out", default=str(common.RESULTS), help="folder for gpu_cifar.json / gpu_cifar.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="default cifar_resnet18 (--quick: cifar_resnet20)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=20, help="epochs per method (with --fit-epochs: the most)")
    ap.add_argument(
        "--fit-epochs",
        action="store_true",
        help="time a few dense steps first and choose the epochs (at most --epochs) so that every method "
        "completes its whole schedule inside the budget",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default 512 (--quick: 64)")
    ap.add_argument("--lr", type=float, default=0.4)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: CUDA)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--bench-batch-sizes", default=None, help="default 1,32,256,1024 (--quick: 1,8)")
    ap.add_argument("--bench-dtypes", default="fp32,bf16")
    ap.add_argument(
        "--bench-backends", default="eager", help="chase.deploy backends to time (eager,inductor)"
    )
    ap.add_argument("--bench-repeats", type=int, default=None, help="default 30 (--quick: 2)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--bench-reserve-s", type=float, default=None, help="kept for the throughput part (45)")
    ap.add_argument("--workers", type=int, default=16, help="image-decoding threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds: every method once per seed")
    ap.add_argument("--quick", action="store_true", help="tiny model and benchmark (smoke test)")
    args = ap.parse_args()
    start = time.time()
    logging.basicConfig(level=logging.WARNING)
    args.model = args.model or ("cifar_resnet20" if args.quick else "cifar_resnet18")
    args.batch_size = args.batch_size or (64 if args.quick else 512)
    batches = [
        int(b) for b in (args.bench_batch_sizes or ("1,8" if args.quick else "1,32,256,1024")).split(",")
    ]
    repeats = args.bench_repeats or (2 if args.quick else 30)
    reserve = args.bench_reserve_s if args.bench_reserve_s is not None else (0.0 if args.quick else 45.0)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu for a smoke test)")
    args.amp = dev.type == "cuda" if args.amp == "auto" else args.amp == "on"
    # cuDNN autotuning stays off while training: Chase changes layer shapes at every channel event and
    # each new shape would be autotuned again; all methods train alike. It is on for the timing part.
    torch.backends.cudnn.benchmark = False
    methods = args.methods.split(",")
    out = pathlib.Path(args.out)

    root = pathlib.Path(args.data_dir)
    xtr, ytr, classes = load_split(root / "train", args.limit_train, args.seed, args.workers)
    xte, yte, _ = load_split(root / "test", args.limit_test, args.seed + 1, args.workers)
    train = gpu_loader(xtr, ytr, dev, args.batch_size, True, args.seed)
    test = gpu_loader(xte, yte, dev, 1024, False, args.seed)
    load_s = time.time() - start
    print(f"data: {len(ytr)} train / {len(yte)} test images on {dev} in {load_s:.1f} s", flush=True)

    x1 = _fmt(test.images[:1].float(), args.channels_last)
    dense_macs = chase.count_flops(get_model(args.model, num_classes=10).to(dev), x1).dense
    payload: dict[str, Any] = {
        "machine": common.machine(str(dev)),
        "args": vars(args),
        "classes": classes,
        "n_train": len(ytr),
        "n_test": len(yte),
        "load_s": load_s,
        "runs": [],
        "skipped_methods": [],
        "budget_hit": False,
        "wall_s": 0.0,
    }

    def flush() -> None:
        payload["wall_s"] = time.time() - start
        common.write("gpu_cifar", payload, markdown(payload), folder=out)

    deadline = start + args.budget_s - reserve
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    if args.fit_epochs:
        step_s = probe_step_s(args, train, dev)
        planned = args.epochs
        args.epochs = fit_epochs(args, len(methods) * len(seeds), len(train), step_s, deadline - time.time())
        payload["fit"] = {"probe_step_s": step_s, "epochs_cap": planned, "epochs": args.epochs}
        print(f"probe: {step_s * 1e3:.1f} ms per dense step -> {args.epochs} epochs per method", flush=True)
    trained: dict[str, nn.Module] = {}  # the last seed's models are timed
    for method, seed in [(m, sd) for sd in seeds for m in methods]:
        if payload["budget_hit"] or time.time() >= deadline:
            payload["budget_hit"] = True
            payload["skipped_methods"].append(f"{method} (seed {seed})")
            continue
        args.seed = train.sampler.seed = seed  # model init, data order and augmentation follow the seed
        row, model, slim = train_one(method, args, train, test, dev, deadline, dense_macs)
        row["seed"] = seed
        payload["runs"].append(row)
        payload["budget_hit"] |= row["truncated"]
        if method == "dense":
            trained["dense"] = model
        if slim is not None:
            trained[f"slim_{method}"] = slim
        del model
        flush()

    if "dense" not in trained:  # time the untrained dense shape: speed does not depend on the weights
        trained = {"dense": get_model(args.model, num_classes=10).eval(), **trained}
    if len(trained) < 2:
        payload["bench_note"] = "no slim model was trained (no Chase run finished)"
    elif time.time() > start + args.budget_s - 5:
        payload["bench_note"] = "skipped: time budget spent"
        payload["budget_hit"] = True
    else:
        torch.backends.cudnn.benchmark = dev.type == "cuda"
        cpu = {k: m.cpu() for k, m in trained.items()}  # benchmark copies and moves them itself
        macs = {k: chase.count_flops(m, x1.cpu().float().contiguous()).dense for k, m in cpu.items()}
        payload["bench"] = benchmark(
            cpu,
            tuple(xtr.shape[1:]),
            batch_sizes=batches,
            dtypes=args.bench_dtypes.split(","),
            device=dev,
            channels_last=(args.channels_last,),
            backends=args.bench_backends.split(","),
            warmup=3 if args.quick else 10,
            repeats=repeats,
            macs=macs,
            meta={"model": args.model, "slim": "trained Chase runs of this script, exported"},
        )
    flush()
    print(markdown(payload))
    print(f"wrote {out / 'gpu_cifar.json'} and {out / 'gpu_cifar.md'} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
