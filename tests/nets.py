"""Small models and helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyResNet(nn.Module):
    """conv-bn-relu stem, one residual block (add), a strided block with a 1x1 shortcut, pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.block_a = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(w)
        self.block_b = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(w)
        self.down = nn.Conv2d(w, 2 * w, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn_a(self.block_a(x)))
        x = torch.relu(x + self.bn_b(self.block_b(y)))
        x = torch.relu(self.down(x) + self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def batch(i: int, n: int = 8, size: int = 16, classes: int = 10, dtype=torch.float32):
    """Deterministic synthetic batch number ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(
        0, classes, (n,), generator=g
    )


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if name == "nesterov":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    raise ValueError(name)


def tiny_chase(example_inputs: torch.Tensor, **options):
    """A seeded ``TinyResNet(width=32)``, its SGD optimizer and a Chase over 40 steps (density 0.3, updates
    every 8 steps, channel events every 4, also in a ``channels`` spec that leaves them at the default);
    ``options`` override or add Chase options."""
    import chase

    torch.manual_seed(0)
    model = TinyResNet(width=32)
    opt = make_optimizer("sgd", model)
    kw = {"density": 0.3, "total_steps": 40, "update_every": 8, **options}
    spec = kw.get("channels")
    if spec is None:
        kw.setdefault("channel_every", 4)
    elif spec.channel_every == chase.ChannelSpec().channel_every:  # the spec's default: events every 4 here
        kw["channels"] = spec.replace(channel_every=4)
    return model, opt, chase.Chase(model, opt, example_inputs=example_inputs, **kw)


def train_step(model, optimizer, sparsifier, i: int, size: int = 16, n: int = 8):
    x, y = batch(i, n=n, size=size, dtype=next(model.parameters()).dtype)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    info = sparsifier.step() if sparsifier is not None else None
    optimizer.zero_grad()
    return info


def in_process_group(rank: int, world: int, init_file: str, body, *args) -> None:
    """``mp.spawn`` target: ``body(rank, world, *args)`` inside a gloo process group of ``world`` CPU
    processes. The group is torn down only after ``body`` has returned on every rank and its objects
    (DDP reducers, pending work) are collected: gloo threads that outlive them can abort the process at
    exit ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


#: `chase train --set` options of a tiny Chase run: 32 synthetic 8x8 images in batches of 16, two
#: epochs = 4 steps, channel events at steps 1 and 2, exploration updates at steps 1-3 (one after the
#: last event, which the schedule validation requires).
TINY_CHASE_RUN = [
    "dataset=synthetic",
    "image_size=8",
    "synthetic_train=32",
    "synthetic_test=16",
    "batch_size=16",
    "num_workers=0",
    "epochs=2",
    "model=cifar_resnet20",
    "update_every=1",
    "channel_every=1",
    "channel_end_epoch=1",
    "channel_sparsity=0.5",
    "density=0.2",
    "lr=0.05",
    "speedup_batch=0",
    "threads=1",
    "method=chase",
    "name=chase",
]


def linear_table(
    model: nn.Module, example_inputs: torch.Tensor, slopes: dict[str, float] | None = None, **options
) -> dict:
    """A latency table (its dict) of ``model``'s prunable groups (Chase's, for ``options`` such as
    ``prune_skip``) where the time falls linearly with each group's width: ``slopes[group]`` ms per
    channel (1e-3 for the groups not named). Dense time: 10 ms."""
    from chase.sparse.targets import find_sparse_params
    from chase.sparsifier.pruner import ChannelPruner
    from chase.sparsifier.specs import ChannelSpec

    groups = ChannelPruner(
        model, example_inputs, find_sparse_params(model), ChannelSpec(channel_sparsity=0.0, **options)
    )
    table = {}
    for g in groups.groups:
        slope = (slopes or {}).get(g.name, 1e-3)
        table[g.name] = {"widths": [1, g.width], "ms": [10.0 - slope * (g.width - 1), 10.0]}
    return {"format_version": 1, "dense_ms": 10.0, "groups": table}
