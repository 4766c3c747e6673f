"""The device-resident loader: same images and augmentation semantics as the torchvision pipeline, exact
mid-epoch resume, clear errors."""

from __future__ import annotations

import pathlib

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from chase.train.config import ConfigError, TrainConfig
from chase.train.data import EpochSampler, build_data
from chase.train.resident import ResidentLoader, dataset_tensors, random_crop_flip


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        crops = [padded[i, :, a : a + 6, b : b + 6] for a in range(5) for b in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        flipped = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or flipped, f"image {i} is no (flipped) crop of its padded source"
        flips += int(flipped and not plain)
    assert 10 < flips < 54  # both flipped and unflipped images occur
    assert torch.equal(out, random_crop_flip(x, 2, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_crop_flip(x, 2, torch.Generator().manual_seed(1)))


def _loader(n: int = 50, bs: int = 8, **kw) -> tuple[ResidentLoader, EpochSampler]:
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(n) % 10
    smp = EpochSampler(n, shuffle=True, seed=3)
    return ResidentLoader(x, y, smp, bs, drop_last=True, augment=True, **kw), smp


def test_mid_epoch_start_gives_the_rest_of_the_epoch_exactly():
    loader, smp = _loader()
    smp.set_epoch(2)
    loader.generator.manual_seed(17)
    full = list(loader)
    assert len(full) == len(loader) == 50 // 8
    smp.set_epoch(2, start=3 * 8)
    loader.generator.manual_seed(17)
    rest = list(loader)
    assert len(rest) == len(full) - 3
    for (a, ya), (b, yb) in zip(full[3:], rest):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    smp.set_epoch(3)
    loader.generator.manual_seed(18)
    assert not torch.equal(next(iter(loader))[0], full[0][0])  # a new epoch: new order and crops


def test_ranks_augment_differently():
    a, _ = _loader(rank=0)
    b, _ = _loader(rank=1)
    b.images, b.labels = a.images, a.labels
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])


def test_bad_arguments():
    x, y = torch.zeros(4, 3, 2, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        ResidentLoader(x, y, range(4), 2)
    with pytest.raises(ValueError, match="batch_size"):
        ResidentLoader(x, torch.zeros(4, dtype=torch.long), range(4), 0)
    with pytest.raises(ValueError, match="mean and std"):
        ResidentLoader(x, torch.zeros(4, dtype=torch.long), range(4), 2, mean=(0.5,) * 3)
    with pytest.raises(TypeError, match="loader=workers"):
        dataset_tensors(torch.utils.data.TensorDataset(x))


def _image_folder(root: pathlib.Path, sizes=((8, 8),)) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 6)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n // 3):
                h, w = sizes[i % len(sizes)]
                arr = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")  # lossless, so values compare exactly


def _cfg(root: pathlib.Path, **kw) -> TrainConfig:
    base = dict(
        dataset="cifar10",
        data_dir=str(root),
        image_size=8,
        batch_size=4,
        num_workers=0,
        augment="none",
        method="dense",  # a data test: no sparsifier (its schedule would not fit 20 steps)
    )
    return TrainConfig(**{**base, **kw}).validate()


def test_image_folder_matches_the_torchvision_pipeline(tmp_path):
    _image_folder(tmp_path)
    resident = build_data(_cfg(tmp_path, loader="resident"))
    workers = build_data(_cfg(tmp_path, loader="workers"))
    assert isinstance(resident.train, ResidentLoader) and not isinstance(workers.train, ResidentLoader)
    for a, b in ((resident.test, workers.test), (resident.train, workers.train)):
        xa, ya = map(torch.cat, zip(*a))
        xb, yb = map(torch.cat, zip(*b))
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=0, atol=1e-5)  # same pixels, same normalisation


def test_validation_split_is_the_same_images(tmp_path):
    _image_folder(tmp_path)
    resident = build_data(_cfg(tmp_path, loader="resident", val_split=0.25))
    workers = build_data(_cfg(tmp_path, loader="workers", val_split=0.25))
    xa, ya = map(torch.cat, zip(*resident.val))
    xb, yb = map(torch.cat, zip(*workers.val))
    assert len(ya) == 3 and torch.equal(ya, yb)
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-5)


def test_resident_errors_are_clear(tmp_path):
    _image_folder(tmp_path, sizes=((8, 8), (9, 8)))
    with pytest.raises(ValueError, match="one size"):
        build_data(_cfg(tmp_path, loader="resident"))
    with pytest.raises(ConfigError, match="loader=workers"):
        build_data(_cfg(tmp_path, loader="resident", augment="imagenet"))
    other = tmp_path / "other"
    _image_folder(other)
    with pytest.raises(ConfigError, match="image_size"):
        build_data(_cfg(other, loader="resident", image_size=16))


@pytest.mark.parametrize("val_split", [0.0, 0.25])
def test_train_limit_takes_the_same_subset_for_both_loaders(tmp_path, val_split):
    _image_folder(tmp_path)
    a = build_data(_cfg(tmp_path, loader="resident", train_limit=8, val_split=val_split))
    b = build_data(_cfg(tmp_path, loader="workers", train_limit=8, val_split=val_split))
    assert len(a.train_sampler) == len(b.train_sampler) == 8 and a.steps_per_epoch == 2
    xa, _ = map(torch.cat, zip(*a.train))
    xb, _ = map(torch.cat, zip(*b.train))
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-5)
    assert (a.val is None) == (val_split == 0)


def test_torchvision_cifar_layout_is_read_from_its_array():
    class FakeCIFAR(torch.utils.data.Dataset):  # torchvision's CIFAR10 keeps N x H x W x 3 uint8 in .data
        def __init__(self) -> None:
            self.data = torch.randint(0, 256, (5, 4, 4, 3), dtype=torch.uint8).numpy()
            self.targets = [0, 1, 2, 3, 4]

    ds = FakeCIFAR()
    x, y = dataset_tensors(ds)
    assert x.shape == (5, 3, 4, 4) and y.tolist() == ds.targets
    assert torch.equal(x[2].permute(1, 2, 0), torch.as_tensor(ds.data[2]))
    sub_x, sub_y = dataset_tensors(torch.utils.data.Subset(ds, [4, 1]))
    assert torch.equal(sub_x, x[[4, 1]]) and sub_y.tolist() == [4, 1]


def test_train_limit_decodes_only_the_images_it_uses(tmp_path, monkeypatch):
    """train_limit=8 of a 12-image folder decodes 8 training images (and the test split), not all 12."""
    import chase.train.resident as resident

    _image_folder(tmp_path)
    real, seen = resident.decode_images, []

    def counting(paths, *args, **kwargs):
        seen.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(resident, "decode_images", counting)
    data = build_data(_cfg(tmp_path, loader="resident", train_limit=8))
    assert seen[0] == 8 and len(data.train_sampler) == 8
