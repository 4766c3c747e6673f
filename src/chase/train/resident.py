"""A device-resident loader for small datasets (CIFAR-sized): every image is decoded once into one tensor
on the training device, and batches are cut, augmented (random crop with zero padding + horizontal flip)
and normalised there.

Why: on a GPU the per-image PIL pipeline, not the model, limits CIFAR training; on a small CPU the JPEG
decoding competes with the model for the same cores. Holding CIFAR-10 costs 150 MB (uint8).

Resume: the order comes from the sampler (a pure function of seed and epoch), and batch ``b`` of an
epoch draws its crops and flips from a generator seeded with ``(epoch seed, b, rank)`` -- so a run
resumed in the middle of an epoch sees exactly the batches of the uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler, Subset

from chase.train.seeds import batch_seed

log = logging.getLogger(__name__)

__all__ = [
    "ImageDecodeError",
    "ResidentLoader",
    "apply_crop_flip",
    "crop_flip_params",
    "dataset_tensors",
    "decode_images",
    "random_crop_flip",
]


class ImageDecodeError(ValueError):
    """An image file that cannot be read or decoded (corrupt, truncated, not an image); ``path`` names it."""

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(f"cannot decode image {path}: {type(cause).__name__}: {cause}")
        self.path = path


def _decode(path: str) -> torch.Tensor:
    from PIL import Image

    # PIL's errors ("Truncated File Read", "cannot identify image file") do not always name the file, and
    # a dataset holds thousands of them.
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            flat = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            return flat.view(im.size[1], im.size[0], 3)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some malformed headers
        raise ImageDecodeError(path, e) from e


def decode_images(paths: Sequence[str | os.PathLike], workers: int = 0) -> torch.Tensor:
    """Decode image files (any PIL format) into one ``uint8`` tensor N x 3 x H x W (RGB).

    All images must have the same size. ``workers`` threads decode in parallel (PIL releases the GIL);
    0 uses one per CPU core.
    """
    if not paths:
        raise ValueError("no images to decode")
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        images = list(ex.map(_decode, [str(p) for p in paths], chunksize=256))
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) > 1:
        raise ValueError(
            f"images differ in size ({sorted(sizes)[:3]} ...): a resident loader needs one size; "
            "use loader=workers for such data"
        )
    return torch.stack(images).permute(0, 3, 1, 2).contiguous()


def dataset_tensors(ds: Dataset, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a dataset as tensors, without its transforms.

    Understands torchvision's CIFAR datasets (their ``data`` array), ``ImageFolder``-style datasets (their
    ``samples`` file list, decoded once), tensor datasets with ``images``/``targets`` (the synthetic set)
    and ``Subset`` of any of these.
    """
    if isinstance(ds, Subset):
        if hasattr(ds.dataset, "samples"):  # decode only the chosen files
            samples = [ds.dataset.samples[i] for i in ds.indices]
            log.info("decoding %d of %d images into memory", len(samples), len(ds.dataset.samples))
            return decode_images([p for p, _ in samples], workers), torch.as_tensor([c for _, c in samples])
        x, y = dataset_tensors(ds.dataset, workers)
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        return x[idx], y[idx]
    labels = getattr(ds, "targets", None)
    if hasattr(ds, "samples"):  # ImageFolder / DatasetFolder
        paths = [p for p, _ in ds.samples]
        log.info("decoding %d images into memory", len(paths))
        return decode_images(paths, workers), torch.as_tensor([c for _, c in ds.samples], dtype=torch.long)
    data = getattr(ds, "data", None)
    if data is not None and labels is not None:  # torchvision CIFAR: N x H x W x 3 uint8
        x = torch.as_tensor(data)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected N x H x W x 3 image data, got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).contiguous(), torch.as_tensor(labels, dtype=torch.long)
    images = getattr(ds, "images", None)
    if isinstance(images, torch.Tensor) and labels is not None:
        return images, torch.as_tensor(labels, dtype=torch.long)
    raise TypeError(
        f"cannot hold a {type(ds).__name__} in memory as tensors: use loader=workers for this dataset"
    )


def crop_flip_params(
    batch: int, padding: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop offsets (rows, columns) in ``[0, 2 * padding]`` and flip flags for ``batch`` images,
    drawn on the CPU from ``generator`` (so results do not depend on the device the images live on)."""
    oy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return oy, ox, flip


def apply_crop_flip(
    images: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Crop each zero-padded image at its offsets (same size as the input) and flip the flagged ones:
    one gather for the whole batch."""
    b, c, h, w = images.shape
    dev = images.device
    rows = oy.to(dev)[:, None] + torch.arange(h, device=dev)
    cols = ox.to(dev)[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)  # a flipped crop reads columns backwards
    padded = F.pad(images, (padding, padding, padding, padding))
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image (same size as the input) and a random
    horizontal flip, as ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` would do."""
    return apply_crop_flip(images, padding, *crop_flip_params(images.shape[0], padding, generator))


class ResidentLoader:
    """Batches ``(x, y)`` of a tensor dataset that lives on ``device``, in the order of ``sampler``.

    Args:
        images: N x C x H x W, ``uint8`` (scaled by 1/255 before normalising) or floating point.
        labels: N class indices.
        sampler: yields dataset indices (e.g. :class:`~chase.train.data.EpochSampler`); its ``start``
            attribute, when present, is the number of samples of the epoch already consumed.
        batch_size: images per batch.
        drop_last: drop a last incomplete batch.
        augment: random crop (``padding`` pixels of zeros) + flip per training image.
        mean, std: per-channel normalisation after scaling to [0, 1]; None for none.
        device: where images and batches live.
        rank: this process's rank (its augmentation differs from the other ranks').

    ``generator`` is seeded by the trainer at the start of each epoch, as for a ``DataLoader``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sampler: Sampler[int],
        batch_size: int,
        *,
        drop_last: bool = False,
        augment: bool = False,
        padding: int = 4,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device)
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.augment, self.padding, self.rank = augment, padding, rank
        self.generator = torch.Generator()
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None and std is not None:
            self.mean: Optional[torch.Tensor] = torch.tensor(mean, device=device).view(1, -1, 1, 1)
            self.std: Optional[torch.Tensor] = torch.tensor(std, device=device).view(1, -1, 1, 1)
        else:
            self.mean = self.std = None
        self.scale = scale

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.scale != 1.0:
            x = x / self.scale
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dev = self.images.device
        # One host-to-device copy per epoch: per-batch copies of pageable memory would stall a GPU queue.
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        batches = len(self)
        params = self._epoch_params(batches) if self.augment else None
        order, params = order.to(dev), [t.to(dev) for t in params] if params else None
        for j in range(batches):
            idx = order[j * self.batch_size : (j + 1) * self.batch_size]
            x = self.images[idx]
            if params is not None:
                oy, ox, flip = (t[j * self.batch_size : j * self.batch_size + len(idx)] for t in params)
                x = apply_crop_flip(x, self.padding, oy, ox, flip)
            yield self._finish(x), self.labels[idx]

    def _epoch_params(self, batches: int) -> list[torch.Tensor]:
        """Crop/flip parameters of the epoch's remaining batches; batch ``b`` of the epoch always draws
        from a generator seeded with (epoch seed, b, rank), whatever batch the iteration starts at."""
        first = getattr(self.sampler, "start", 0) // self.batch_size  # batches consumed before a resume
        epoch_seed = self.generator.initial_seed()
        gen = torch.Generator()
        parts = []
        for j in range(batches):
            gen.manual_seed(batch_seed(epoch_seed, first + j, self.rank))
            parts.append(crop_flip_params(self.batch_size, self.padding, gen))
        return [torch.cat(t) for t in zip(*parts)]

    def __repr__(self) -> str:
        n, *shape = self.images.shape
        return (
            f"ResidentLoader({n} x {tuple(shape)} {self.images.dtype} on {self.images.device}, "
            f"batch_size={self.batch_size}, augment={self.augment})"
        )
