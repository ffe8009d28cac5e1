"""Tests of the ImageFolder/DataLoader path (data.name=imagenet) on a tiny generated ImageFolder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from normbench.data import DataError, build_data

from conftest import imagenet_cfg

CPU = torch.device("cpu")
CLASSES = ("ant", "bee")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train: 2 classes x 6 images, val: 2 classes x 3 images, 40x50 (h x w), JPEG and PNG."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                arr[..., k] = 255  # class-dependent colour
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(arr).save(d / f"{cls}_{i}.{ext}")
    return root


def make(folder, G=4, rank=0, ws=1, seed=0, **overrides):
    cfg = imagenet_cfg(**{"root": str(folder), "workers": 0, "image_size": 32, "eval_batch": 2, **overrides})
    return build_data(cfg, global_batch=G, rank=rank, world_size=ws, seed=seed, device=CPU)


def collect(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    out = list(loader)
    return [x for x, _ in out], [y for _, y in out]


def test_bundle_shapes(folder):
    b = make(folder, G=4)
    assert (b.name, b.num_classes, b.in_channels, b.image_size, b.num_train, b.num_eval) == (
        "imagenet",
        2,
        3,
        32,
        12,
        6,
    )
    assert len(b.train) == 3
    xs, ys = collect(b.train, 0)
    assert len(xs) == 3 and all(x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 for x in xs)
    assert all(y.dtype == torch.int64 for y in ys)
    # 12 images in 3 batches of 4: the epoch visits every image once (6 per class), shuffled
    labels = torch.cat(ys)
    assert torch.equal(labels.sort().values, torch.tensor([0] * 6 + [1] * 6))
    assert not torch.equal(labels, labels.sort().values)
    images = torch.cat(xs).flatten(1)
    assert torch.cdist(images, images).add(torch.eye(12) * 1e9).min() > 1.0  # 12 different images


def test_world_size_determinism_and_replay(folder):
    ref_x, ref_y = collect(make(folder, G=4, seed=7).train, 2)
    ranks = [collect(make(folder, G=4, rank=r, ws=2, seed=7).train, 2) for r in range(2)]
    for b in range(3):  # rank r takes positions r, r+2, ... of each global batch
        for r in range(2):
            assert torch.equal(ranks[r][0][b], ref_x[b][r::2]) and torch.equal(ranks[r][1][b], ref_y[b][r::2])
    loader = make(folder, G=4, seed=7).train
    state = torch.get_rng_state()
    again = collect(loader, 2)
    assert torch.equal(torch.get_rng_state(), state), "transforms must not consume the trainer's RNG stream"
    assert all(torch.equal(u, v) for u, v in zip(again[0], ref_x))
    other = collect(loader, 3)
    assert not all(torch.equal(u, v) for u, v in zip(other[0], ref_x))


def test_workers_do_not_change_the_data(folder):
    ref = collect(make(folder, G=4, seed=1).train, 1)
    loader = make(folder, G=4, seed=1, workers=2).train
    assert loader.loader.persistent_workers
    for epoch in (1, 1):  # persistent workers, same epoch twice
        got = collect(loader, epoch)
        assert all(torch.equal(u, v) for u, v in zip(got[0] + got[1], ref[0] + ref[1]))


def test_eval_shards(folder):
    full_x, full_y = collect(make(folder).eval)
    assert torch.equal(torch.cat(full_y), torch.tensor([0, 0, 0, 1, 1, 1]))
    parts = [collect(make(folder, G=4, rank=r, ws=4).eval) for r in range(4)]
    assert torch.equal(torch.cat([torch.cat(p[0]) for p in parts if p[0]]), torch.cat(full_x))
    # deterministic: Resize(37) + CenterCrop(32) of the first val image, by hand
    from torchvision.transforms import functional as TF

    img = Image.open(sorted((folder / "val" / "ant").iterdir())[0]).convert("RGB")
    ref = TF.normalize(
        TF.to_tensor(TF.center_crop(TF.resize(img, 37), 32)), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    torch.testing.assert_close(full_x[0][0], ref)


def test_train_subset(folder):
    b = make(folder, G=4, train_subset=8)
    assert b.num_train == 8 and len(b.train) == 2
    assert torch.cat(collect(b.train, 0)[1]).sum() == 2  # first 8 images: 6 of class 0, 2 of class 1


def test_errors(folder, tmp_path):
    with pytest.raises(DataError, match=r"no train/ directory .* set data\.root"):
        build_data(imagenet_cfg(root=str(tmp_path)), global_batch=4, device=CPU)
    with pytest.raises(DataError, match=r"data\.root is not set"):
        build_data(imagenet_cfg(), global_batch=4, device=CPU)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"not a usable ImageFolder"):
        build_data(imagenet_cfg(root=str(tmp_path)), global_batch=4, device=CPU)
    with pytest.raises(DataError, match=r"not divisible by world size 3"):
        make(folder, G=4, ws=3)
    with pytest.raises(DataError, match=r"only 12 training images"):
        make(folder, G=16)
