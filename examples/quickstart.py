"""Sparse training with chase in your own loop: RigL at 10% density on CIFAR-10 (or synthetic data).

python examples/quickstart.py --data-dir ../shared/data/cifar10 --steps 200
python examples/quickstart.py --synthetic            # no data needed, a few seconds
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

import chase
from chase.models import get_model


def loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    if args.synthetic:
        data = torch.utils.data.TensorDataset(torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,)))
    else:
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        tf = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            ]
        )
        data = ImageFolder(f"{args.data_dir}/train", transform=tf)
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/cifar10", help="ImageFolder root with train/")
    p.add_argument("--synthetic", action="store_true", help="random data instead of CIFAR-10")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps to train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--density", type=float, default=0.1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = get_model("cifar_resnet20", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sparsifier = chase.RigL(model, optimizer, density=args.density, total_steps=args.steps, update_every=50)
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for x, y in loader(args):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            info = sparsifier.step()  # after optimizer.step(), before zero_grad()
            optimizer.zero_grad()
            step += 1
            if info.updated or step % 50 == 0:
                logging.info(
                    "step %d  loss %.3f  density %.4f%s",
                    step,
                    loss.item(),
                    sparsifier.global_density(),
                    "  (masks updated)" if info.updated else "",
                )
            if step == args.steps:
                break
    logging.info(
        "done in %.1f s; per-layer densities: %s",
        time.perf_counter() - start,
        {k: round(v, 3) for k, v in sparsifier.layer_densities().items()},
    )


if __name__ == "__main__":
    main()
