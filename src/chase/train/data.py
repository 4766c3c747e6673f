"""Datasets and loaders: CIFAR-10/100, ImageFolder-layout folders, and a synthetic set for tests.

The data order is a pure function of (seed, epoch), and so is the augmentation (per batch in the resident
loader, per sample in the DataLoader one), so a run resumed from a checkpoint -- at an epoch boundary or in
the middle of an epoch -- sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from chase.train.config import ConfigError, TrainConfig
from chase.train.resident import ImageDecodeError, ResidentLoader, dataset_tensors
from chase.train.seeds import epoch_seed, sample_seed, split_seed

log = logging.getLogger(__name__)

__all__ = [
    "Data",
    "EpochSampler",
    "SeededDataset",
    "SeededEpochSampler",
    "SyntheticDataset",
    "build_data",
    "default_data_dir",
]

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def default_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CHASE_DATA", pathlib.Path.home() / ".cache" / "chase" / "data"))


class SyntheticDataset(Dataset):
    """Learnable random images: each class is a fixed random pattern plus per-image noise."""

    def __init__(
        self,
        n: int,
        num_classes: int = 10,
        image_size: int = 32,
        seed: int = 0,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        g = torch.Generator().manual_seed(12345)  # the same class patterns for train and test
        patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)
        g.manual_seed(seed)
        self.targets = torch.randint(0, num_classes, (n,), generator=g)
        self.images = patterns[self.targets] + 1.5 * torch.randn(n, 3, image_size, image_size, generator=g)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.targets[i])


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices of one epoch, split across ranks like ``DistributedSampler``.

    The permutation depends only on ``(seed, epoch)``; ``start`` skips the first samples of this rank's
    share, to resume in the middle of an epoch. With ``pad=False`` (evaluation) the shares are not padded,
    so summing per-rank counts gives exact totals.
    """

    def __init__(
        self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, pad: bool = True
    ) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world, self.pad = n, shuffle, seed, rank, world, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.world > 1:
            total = math.ceil(self.n / self.world) * self.world
            order += order[: total - self.n]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        share = math.ceil(self.n / self.world) if self.pad else len(range(self.rank, self.n, self.world))
        return max(0, share - self.start)


class SeededEpochSampler(EpochSampler):
    """An :class:`EpochSampler` that yields ``(index, seed)``: the seed of a sample depends on the epoch and
    on its position in the epoch's order (over all ranks), for a :class:`SeededDataset`.

    Why: a DataLoader seeds its workers by worker id, and which worker loads which batch shifts when an
    epoch starts in the middle (a resume) or the number of workers changes; per-sample seeds do not.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        order_seed = epoch_seed(self.seed, self.epoch)
        share = self._indices()
        for k in range(self.start, len(share)):
            yield share[k], sample_seed(order_seed, k * self.world + self.rank)


class SeededDataset(Dataset):
    """``dataset[index]`` for a key ``(index, seed)``, loaded with the global torch (CPU), Python and numpy
    RNGs seeded from ``seed`` -- random transforms draw from them -- and restored afterwards, so a sample's
    augmentation depends on its seed only and the caller's RNG streams are left as they were."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(seed)  # CPU only: transforms run on the CPU
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return self.dataset[index]
        except (OSError, SyntaxError, ValueError) as e:  # PIL's decode errors do not name the file
            path = _sample_path(self.dataset, index)
            if path is None or isinstance(e, ImageDecodeError):
                raise
            raise ImageDecodeError(path, e) from None
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def batches(loader: Any) -> Any:
    """Iterate ``loader``; a bad image in a worker process (which DataLoader re-raises as a RuntimeError
    holding the worker's traceback) becomes a one-line ``ConfigError`` naming the file."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except ImageDecodeError as e:  # loaded in this process
            raise ConfigError(f"{e}; remove or replace the file") from None
        except RuntimeError as e:
            line = next((ln for ln in str(e).splitlines() if "cannot decode image" in ln), None)
            if line is None:
                raise
            what = line.split("ImageDecodeError: ")[-1].strip()
            raise ConfigError(f"{what}; remove or replace the file") from None
        yield item


def _sample_path(ds: Any, index: int) -> Optional[str]:
    """The file behind ``ds[index]`` (an ImageFolder, or a Subset of one), or None."""
    while isinstance(ds, Subset):
        ds, index = ds.dataset, ds.indices[index]
    samples = getattr(ds, "samples", None)
    return str(samples[index][0]) if samples is not None else None


#: what the trainer iterates: batches ``(x, y)``, with a ``generator`` it seeds at each epoch
Loader = Union[DataLoader, ResidentLoader]


@dataclass
class Data:
    """The loaders of a run and what the model needs to know about the data."""

    train: Loader
    test: Loader
    val: Optional[Loader]
    num_classes: int
    image_size: int
    train_sampler: EpochSampler
    steps_per_epoch: int


def _transforms(kind: str, size: int, stats: tuple, train: bool, tensor_input: bool) -> Any:
    import torchvision.transforms as T

    to_tensor = [] if tensor_input else [T.ToTensor()]
    norm = [] if stats is None else [T.Normalize(*stats)]
    if kind == "cifar":
        aug = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if train else []
        return T.Compose(aug + to_tensor + norm)
    if kind == "imagenet":
        if train:
            return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *to_tensor, *norm])
        return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *to_tensor, *norm])
    if tensor_input:
        return None
    return T.Compose([T.Resize((size, size)), *to_tensor, *norm])


def _folder_pair(root: pathlib.Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


@dataclass
class _Sets:
    train_aug: Dataset  # training images with augmentation
    train_plain: Dataset  # the same without (for the validation split)
    test: Dataset
    classes: int
    size: int
    augment: str  # the resolved augmentation kind: cifar, imagenet or none
    stats: Optional[tuple]  # normalisation (mean, std), None for none


def _datasets(cfg: TrainConfig) -> _Sets:
    kind = cfg.augment
    if cfg.dataset == "synthetic":
        size = cfg.image_size or 32
        classes = cfg.num_classes or 10
        kind = "cifar" if kind in ("auto", "cifar") else "none"
        aug = _transforms("cifar", size, None, True, True) if kind == "cifar" else None
        make = SyntheticDataset
        return _Sets(
            make(cfg.synthetic_train, classes, size, cfg.seed, aug),
            make(cfg.synthetic_train, classes, size, cfg.seed),
            make(cfg.synthetic_test, classes, size, cfg.seed + 1),
            classes,
            size,
            kind,
            None,
        )
    from torchvision import datasets

    root = pathlib.Path(cfg.data_dir).expanduser() if cfg.data_dir else default_data_dir()
    if cfg.dataset == "imagefolder":
        if not cfg.data_dir:
            raise ConfigError("dataset=imagefolder needs --data-dir (a folder with train/ and test/)")
        if not _folder_pair(root):
            raise ConfigError(f"data_dir {root} must contain train/ and test/ folders (ImageFolder layout)")
        kind, size, stats = ("imagenet" if kind == "auto" else kind), cfg.image_size or 224, IMAGENET_STATS
    else:
        kind, size, stats = (
            ("cifar" if kind == "auto" else kind),
            cfg.image_size or 32,
            CIFAR_STATS[cfg.dataset],
        )

    def tf(train: bool) -> Any:
        return _transforms(kind, size, stats, train, False)

    if _folder_pair(root):  # an ImageFolder copy (e.g. CIFAR as JPEGs); works without network
        sets = [
            datasets.ImageFolder(str(root / s), transform=t)
            for s, t in (("train", tf(True)), ("train", tf(False)), ("test", tf(False)))
        ]
        _check_same_classes(root, sets[0].classes, sets[2].classes)
        classes = len(sets[0].classes)
    else:
        cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
        try:
            sets = [
                cls(str(root), train=s, transform=t, download=cfg.download and s)
                for s, t in ((True, tf(True)), (True, tf(False)), (False, tf(False)))
            ]
        except Exception as e:  # no network, no permission, a broken archive
            raise ConfigError(
                f"could not load {cfg.dataset} from {root} ({type(e).__name__}: {e}). Pass --data-dir with "
                "a folder holding torchvision's CIFAR files or an ImageFolder copy with train/ and test/ "
                "(download needs network)"
            ) from e
        classes = NUM_CLASSES[cfg.dataset]
    if cfg.num_classes and cfg.num_classes < classes:  # a label past the classifier: refused, not a crash
        raise ConfigError(
            f"num_classes={cfg.num_classes}, but the data has {classes} classes ({root}): its labels go up "
            f"to {classes - 1}. Set num_classes={classes} (or 0: from the dataset)"
        )
    return _Sets(sets[0], sets[1], sets[2], cfg.num_classes or classes, size, kind, stats)


def _check_same_classes(root: pathlib.Path, train: list[str], test: list[str]) -> None:
    """ImageFolder numbers classes by their sorted folder names: test/ must hold train/'s class folders,
    or its labels would silently mean other classes."""
    if train == test:
        return
    only_test, only_train = sorted(set(test) - set(train)), sorted(set(train) - set(test))
    raise ConfigError(
        f"{root / 'test'} has classes {_names(test)} but {root / 'train'} has {_names(train)} "
        f"(only in test/: {_names(only_test)}; only in train/: {_names(only_train)}): the test labels would "
        "mean other classes. Give test/ the same class folders as train/"
    )


def _names(names: list[str], most: int = 20) -> str:
    """A list of names for a message, shortened when long (ImageNet has 1000 classes)."""
    if len(names) <= most:
        return str(names)
    return f"[{', '.join(map(repr, names[:most]))}, ... ({len(names)} in all)]"


def _resident(cfg: TrainConfig, sets: _Sets) -> bool:
    """Whether to hold the data on the device: asked for, or (auto) a CIFAR-sized dataset."""
    if cfg.loader == "workers":
        return False
    if cfg.loader == "auto":
        return cfg.dataset in ("cifar10", "cifar100", "synthetic") and sets.augment in ("cifar", "none")
    if sets.augment not in ("cifar", "none"):
        raise ConfigError(
            f"loader=resident supports augment=cifar or none, not {sets.augment!r}: use loader=workers"
        )
    return True


def build_data(
    cfg: TrainConfig, *, rank: int = 0, world: int = 1, device: torch.device | None = None
) -> Data:
    """Loaders for training (sharded over ranks), validation (``val_split`` held out of train) and test."""
    sets = _datasets(cfg)
    train_aug, test, classes, size = sets.train_aug, sets.test, sets.classes, sets.size
    n = len(train_aug)
    train_idx: Optional[list[int]] = None
    val_idx: list[int] = []
    val: Optional[Dataset] = None
    if cfg.val_split > 0 or 0 < cfg.train_limit < n:
        g = torch.Generator().manual_seed(split_seed(cfg.seed))  # fixed split
        perm = torch.randperm(n, generator=g).tolist()
        n_train, n_val = cfg.split_sizes(n)  # the config owns the split (its schedule check uses it too)
        train_idx, val_idx = perm[n_val:][:n_train], perm[:n_val]
        train_aug = Subset(train_aug, train_idx)
        if val_idx:
            val = Subset(sets.train_plain, val_idx)
    pin = device is not None and device.type == "cuda"
    in_memory = _resident(cfg, sets)
    # The DataLoader's training samples carry their augmentation seed; the resident loader seeds per batch.
    sampler_type = EpochSampler if in_memory else SeededEpochSampler
    sampler = sampler_type(len(train_aug), shuffle=True, seed=cfg.seed, rank=rank, world=world)
    workers = cfg.num_workers
    steps = len(sampler) // cfg.batch_size
    if steps == 0:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the {len(sampler)} training images per process"
        )

    def evaluation_sampler(ds: Dataset) -> EpochSampler:
        return EpochSampler(len(ds), shuffle=False, rank=rank, world=world, pad=False)

    if in_memory:
        mean, std = sets.stats if sets.stats is not None else (None, None)

        def resident(x: torch.Tensor, y: torch.Tensor, smp: Sampler, train: bool) -> ResidentLoader:
            if tuple(x.shape[-2:]) != (size, size):
                raise ConfigError(
                    f"loader=resident needs {size}x{size} images, the data has {tuple(x.shape[-2:])}: "
                    "set image_size to match or use loader=workers"
                )
            augment = train and sets.augment == "cifar"
            dev = device or "cpu"
            return ResidentLoader(
                x,
                y,
                smp,
                cfg.batch_size,
                drop_last=train,
                augment=augment,
                mean=mean,
                std=std,
                device=dev,
                rank=rank,
            )

        # The training and validation images come from the same files: decode them once, and only the
        # ones used (train_limit=2000 decodes 2,000 images, not the whole set).
        used = None if train_idx is None else [*train_idx, *val_idx]
        try:
            x_all, y_all = dataset_tensors(sets.train_aug if used is None else Subset(sets.train_aug, used))
            x_test, y_test = dataset_tensors(test)
        except ImageDecodeError as e:  # a corrupt or truncated file: say which, the run cannot start
            raise ConfigError(f"{e}; remove or replace the file (loader=resident decodes every image)") from e
        n_train = len(x_all) if train_idx is None else len(train_idx)
        x_tr, y_tr = x_all[:n_train], y_all[:n_train]
        tr = resident(x_tr, y_tr, sampler, True)
        te = resident(x_test, y_test, evaluation_sampler(test), False)
        va = None
        if val is not None:
            va = resident(x_all[n_train:], y_all[n_train:], evaluation_sampler(val), False)
        log.info("data held in memory: %r", tr)
        return Data(tr, te, va, classes, size, sampler, steps)

    def loader(ds: Dataset, smp: Sampler, drop_last: bool, **kw: Any) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=cfg.batch_size,
            sampler=smp,
            num_workers=workers,
            pin_memory=pin,
            drop_last=drop_last,
            persistent_workers=False,
            **kw,
        )

    # Augmentation draws from per-sample seeds (SeededDataset), not from the worker's RNG: which worker
    # loads a batch depends on where the iteration started. The loader's own generator (re-seeded per
    # epoch by the trainer) still draws the workers' base seed, so the global RNG is not consumed when an
    # iterator starts (a resumed run would otherwise drift).
    train = loader(SeededDataset(train_aug), sampler, True, generator=torch.Generator())

    def evaluation(ds: Dataset) -> DataLoader:
        return loader(ds, evaluation_sampler(ds), False)

    return Data(
        train, evaluation(test), evaluation(val) if val is not None else None, classes, size, sampler, steps
    )
