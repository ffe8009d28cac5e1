"""Tests of the on-device data layer (normbench.data): Fashion-MNIST, CIFAR, synthetic, augmentation, sharding."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from normbench.data import DataBundle, DataError, build_data
from normbench.data import fashion_mnist as fm
from normbench.data.device_loader import build_device_loaders, crop_grids, draw_augment_params, gather_crop

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "data"
CPU = torch.device("cpu")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
HAVE_DEBIAN = all((DEBIAN / (s + ".gz")).is_file() for s in fm.FILES.values())


def load_cfg(config: str, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


def collect(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return list(xs), list(ys)


def assert_one_line_with_fix(err: pytest.ExceptionInfo, *needles: str):
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg
    for n in needles:
        assert n in msg, (n, msg)


# ----------------------------------------------------------------------------------------------- configs

COMMON_KEYS = {
    "name",
    "root",
    "download",
    "augment",
    "mean",
    "std",
    "eval_batch",
    "train_subset",
    "epoch_size",
}
EXTRA_KEYS = {
    "fashion_mnist": set(),
    "cifar10": set(),
    "cifar100": set(),
    "imagenet": {"image_size", "decoder", "workers"},  # the on-device data sets have no loader workers
    "synthetic": {"num_train", "num_eval", "image_size", "channels", "num_classes", "data_seed"},
}


@pytest.mark.parametrize("name", sorted(EXTRA_KEYS))
def test_config_files_complete(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("#"), "config must start with a comment"
    cfg = OmegaConf.load(path)
    assert cfg.name == name
    assert set(cfg.keys()) >= COMMON_KEYS | EXTRA_KEYS[name]
    aug_keys = {"min_scale", "flip"} if name == "imagenet" else {"crop_padding", "flip"}
    assert set(cfg.augment.keys()) >= aug_keys
    expected_pad = {"fashion_mnist": 2, "cifar10": 4, "cifar100": 4}
    if name in expected_pad:
        assert cfg.augment.crop_padding == expected_pad[name] and cfg.augment.flip is True
    assert cfg.download is (name not in ("imagenet", "synthetic"))
    assert cfg.root is None and cfg.train_subset is None


# ----------------------------------------------------------------------------------------------- augmentation


def naive_crop_flip(x, oy, ox, fl, p):
    """Per-image Python reference: F.pad + slicing + flip."""
    out = []
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        img = F.pad(x[i : i + 1], (p, p, p, p))[0]
        img = img[:, int(oy[i]) : int(oy[i]) + h, int(ox[i]) : int(ox[i]) + w]
        if bool(fl[i]):
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("p,c,h,w", [(0, 3, 8, 8), (2, 1, 28, 28), (4, 3, 32, 32), (3, 2, 7, 11)])
def test_batched_crop_flip_matches_naive(p, c, h, w):
    g = torch.Generator().manual_seed(p * 100 + c)
    x = torch.randint(0, 256, (37, c, h, w), generator=g, dtype=torch.uint8)
    oy, ox, fl = draw_augment_params(37, p, True, seed=5, epoch=p)
    assert oy.min() >= 0 and oy.max() <= 2 * p and ox.max() <= 2 * p
    wp = w + 2 * p  # the loader's path: padded images, one gather per batch
    row_off, col_table = crop_grids(h, w, wp, x.device)
    got = gather_crop(F.pad(x, (p, p, p, p)), oy * wp + ox, fl.long(), row_off, col_table)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, naive_crop_flip(x, oy, ox, fl, p))
    if p:  # every offset and both flips occur in 37 draws for small p; sanity that it is random
        assert fl.any() and (~fl).any()


def test_augment_params_world_size_free_and_flip_off():
    a = draw_augment_params(100, 4, True, seed=1, epoch=2)
    b = draw_augment_params(100, 4, True, seed=1, epoch=2)
    c = draw_augment_params(100, 4, True, seed=1, epoch=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not draw_augment_params(100, 4, False, seed=1, epoch=2)[2].any()


# ----------------------------------------------------------------------------------------------- device loaders


def index_dataset(n=103, c=3, h=6, w=5):
    """Images whose pixels are random; labels are the image indices (to track the order)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return x, torch.arange(n)


MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def make_loaders(x, y, *, G, rank=0, ws=1, seed=3, padding=2, flip=True, eval_batch=10):
    return build_device_loaders(
        "t",
        x,
        y,
        x,
        y,
        padding=padding,
        flip=flip,
        mean=MEAN,
        std=STD,
        eval_batch=eval_batch,
        global_batch=G,
        rank=rank,
        world_size=ws,
        seed=seed,
        device=CPU,
    )


def naive_normalize(x):
    m = torch.tensor(MEAN).view(1, -1, 1, 1)
    s = torch.tensor(STD).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def find_crops(batch, x, labels, p):
    """For each training image, every (oy, ox, flip) whose crop of its zero-padded source image (the label is
    the source's index) gives that image after normalization -- brute force over every crop in bounds."""
    h, w = x.shape[-2:]
    sources = F.pad(x[labels], (p, p, p, p))
    keys, hits = [], []
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            crop = sources[:, :, oy : oy + h, ox : ox + w]
            for fl in (False, True):
                candidate = naive_normalize(crop.flip(-1) if fl else crop)
                keys.append((oy, ox, fl))
                hits.append(torch.isclose(batch, candidate, rtol=1e-6, atol=1e-5).flatten(1).all(1))
    hits = torch.stack(hits, 1)  # (images, candidates)
    return [[keys[j] for j in row.nonzero().flatten().tolist()] for row in hits]


def epoch_crops(loader, x, epoch, p) -> tuple[torch.Tensor, dict[int, tuple]]:
    """An epoch's order (labels = image indices) and, per image, its one matching crop."""
    xs, ys = collect(loader, epoch)
    for xb, yb in zip(xs, ys):
        assert yb.dtype == torch.int64 and xb.dtype == torch.float32 and xb.is_contiguous()
    order = torch.cat(ys)
    matches = find_crops(torch.cat(xs), x, order, p)
    assert all(len(m) == 1 for m in matches), "an image that is not exactly one crop of its padded source"
    return order, {int(i): m[0] for i, m in zip(order, matches)}


def test_train_loader_follows_the_documented_rule():
    """The rules of normbench/data/common.py, checked from first principles (not with the code's own generators):
    an epoch visits every image exactly once, shuffled, in global batches of G; each training image is a crop,
    within bounds, of its zero-padded source, maybe flipped, normalized per channel; the same (seed, epoch)
    replays order and crops; another epoch or another seed draws a new order and new crops."""
    n, G, p = 108, 12, 2  # 9 full batches: every image exactly once
    x, y = index_dataset(n)
    train, _ = make_loaders(x, y, G=G, seed=3, padding=p)
    assert len(train) == n // G
    order, crops = epoch_crops(train, x, 4, p)
    assert torch.equal(order.sort().values, torch.arange(n))  # a permutation
    assert not torch.equal(order, torch.arange(n))  # shuffled
    # crops are random: many offsets, both flips (50 equally likely choices per image, 108 images)
    assert len({(oy, ox) for oy, ox, _ in crops.values()}) > 15
    assert {fl for _, _, fl in crops.values()} == {False, True}
    replay_order, replay_crops = epoch_crops(make_loaders(x, y, G=G, seed=3, padding=p)[0], x, 4, p)
    assert torch.equal(replay_order, order) and replay_crops == crops  # a fresh loader replays the epoch
    next_order, next_crops = epoch_crops(train, x, 5, p)
    assert not torch.equal(next_order, order)
    assert sum(next_crops[i] == crops[i] for i in range(n)) < n // 4  # 1 in 50 keeps its crop by chance
    other_seed, _ = epoch_crops(make_loaders(x, y, G=G, seed=4, padding=p)[0], x, 4, p)
    assert not torch.equal(other_seed, order)
    # an indivisible set: the last partial batch is dropped, no image twice
    xs, ys = collect(make_loaders(*index_dataset(103), G=G, seed=3, padding=p)[0], 4)
    assert [len(b) for b in ys] == [G] * (103 // G) and torch.cat(ys).unique().numel() == 103 // G * G


@pytest.mark.parametrize("ws", [2, 4])
def test_ranks_interleave_to_world_size_one(ws):
    """Rank r of ws takes positions r, r+ws, ... of the global batch (so position p is on GPU p mod gpus)."""
    x, y = index_dataset()
    G = 12
    ref_x, ref_y = collect(make_loaders(x, y, G=G)[0], epoch=1)
    per_rank = []
    for r in range(ws):
        train = make_loaders(x, y, G=G, rank=r, ws=ws)[0]
        assert len(train) == len(ref_y)
        xs, ys = collect(train, epoch=1)
        assert all(t.shape[0] == G // ws for t in ys)
        per_rank.append((xs, ys))
    for b in range(len(ref_y)):
        for r, (xs, ys) in enumerate(per_rank):
            assert torch.equal(xs[b], ref_x[b][r::ws]) and torch.equal(ys[b], ref_y[b][r::ws])


def test_epoch_replay_and_epochs_differ_and_global_rng_untouched():
    x, y = index_dataset()
    train = make_loaders(x, y, G=8, rank=1, ws=2)[0]
    state = torch.get_rng_state()
    a = collect(train, epoch=2)
    b = collect(train, epoch=2)
    assert torch.equal(torch.get_rng_state(), state), "the loader must not consume the global torch RNG"
    assert all(torch.equal(u, v) for u, v in zip(a[0] + a[1], b[0] + b[1]))
    c = collect(train, epoch=3)
    assert not torch.equal(torch.cat(a[1]), torch.cat(c[1]))
    # a fresh loader (as after a resume) at the same epoch replays it
    d = collect(make_loaders(x, y, G=8, rank=1, ws=2)[0], epoch=2)
    assert all(torch.equal(u, v) for u, v in zip(a[0] + a[1], d[0] + d[1]))
    # an epoch visits distinct images
    ys = torch.cat(collect(make_loaders(x, y, G=8)[0], epoch=2)[1])
    assert ys.unique().numel() == ys.numel() == (103 // 8) * 8


@pytest.mark.parametrize("ws", [1, 3])
def test_eval_shards_disjoint_cover_in_order_unaugmented(ws):
    x, y = index_dataset()
    xs, ys = [], []
    for r in range(ws):
        _, ev = make_loaders(x, y, G=6, rank=r, ws=ws, eval_batch=7)
        bx, by = collect(ev)
        assert len(ev) == len(by) and all(t.shape[0] <= 7 for t in by)
        assert torch.equal(collect(ev)[0][0], bx[0])  # deterministic
        xs += bx
        ys += by
    assert torch.equal(torch.cat(ys), y)
    torch.testing.assert_close(torch.cat(xs), naive_normalize(x), rtol=1e-6, atol=1e-5)


def test_no_augmentation_path():
    x, y = index_dataset()
    train = make_loaders(x, y, G=10, padding=0, flip=False)[0]
    xs, ys = collect(train, 0)
    torch.testing.assert_close(torch.cat(xs), naive_normalize(x[torch.cat(ys)]), rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------- batch errors


def test_indivisible_and_oversized_batches():
    cfg = load_cfg("synthetic", num_train=64, num_eval=16)
    with pytest.raises(DataError) as e:
        build_data(cfg, global_batch=10, world_size=4, device=CPU)
    assert_one_line_with_fix(e, "not divisible by world size 4", "multiple")
    with pytest.raises(DataError) as e:
        build_data(cfg, global_batch=128, device=CPU)
    assert_one_line_with_fix(e, "only 64 training images", "lower the batch")
    with pytest.raises(DataError) as e:
        build_data(load_cfg("synthetic", train_subset=100000), global_batch=8, device=CPU)
    assert_one_line_with_fix(e, "train_subset", "set data.train_subset")
    with pytest.raises(DataError) as e:
        build_data(load_cfg("synthetic", name="mnist"), global_batch=8, device=CPU)
    assert_one_line_with_fix(e, "unknown data set", "fashion_mnist")


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_bundle_deterministic_and_learnable():
    cfg = load_cfg("synthetic", num_train=600, num_eval=200, image_size=12, channels=2, num_classes=4)
    b1 = build_data(cfg, global_batch=32, seed=0, device=CPU)
    b2 = build_data(cfg, global_batch=32, seed=9, device=CPU)
    assert isinstance(b1, DataBundle)
    assert (b1.name, b1.num_classes, b1.in_channels, b1.image_size, b1.num_train, b1.num_eval) == (
        "synthetic",
        4,
        2,
        12,
        600,
        200,
    )
    assert len(b1.train) == 600 // 32
    ev1, ev2 = collect(b1.eval), collect(b2.eval)
    assert torch.equal(torch.cat(ev1[0]), torch.cat(ev2[0]))  # the data set does not depend on the training seed
    # nearest class mean (fitted on the train split) classifies the eval split far above chance
    tx, ty = collect(b1.train, 0)
    tx, ty = torch.cat(tx).flatten(1), torch.cat(ty)
    assert torch.bincount(ty, minlength=4).min() > 100
    centroids = torch.stack([tx[ty == k].mean(0) for k in range(4)])
    ex, ey = torch.cat(ev1[0]).flatten(1), torch.cat(ev1[1])
    acc = (torch.cdist(ex, centroids).argmin(1) == ey).float().mean().item()
    assert acc > 0.8, acc
    # subset = first N images
    b3 = build_data(
        load_cfg("synthetic", num_train=600, num_eval=200, image_size=12, channels=2, num_classes=4, train_subset=64),
        global_batch=32,
        device=CPU,
    )
    assert b3.num_train == 64 and len(b3.train) == 2
    assert torch.equal(b3.train.images, b1.train.images[:64])


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool):
    payload = (
        struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()
    )
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_fashion(root: Path, n_train=40, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        write_idx(root / fm.FILES[f"{split}_images"], imgs, fm.IMAGE_MAGIC, gz)
        write_idx(root / fm.FILES[f"{split}_labels"], labels, fm.LABEL_MAGIC, gz)
        arrays[split] = (imgs, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx_round_trip(tmp_path, gz):
    arrays = make_fashion(tmp_path, gz=gz)
    files = fm.find_files(tmp_path)
    for split in ("train", "test"):
        x, y = fm.load_split(files, split)
        assert x.dtype == torch.uint8 and x.shape == (len(arrays[split][1]), 1, 28, 28)
        assert np.array_equal(x[:, 0].numpy(), arrays[split][0])
        assert np.array_equal(y.numpy(), arrays[split][1].astype(np.int64))
    b = build_data(load_cfg("fashion_mnist", root=str(tmp_path), download=False), global_batch=8, device=CPU)
    assert (b.num_train, b.num_eval, b.in_channels, b.image_size, b.num_classes) == (40, 20, 1, 28, 10)
    x, y = next(iter(b.train))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_fashion_torchvision_layout(tmp_path):
    """Files in torchvision's ROOT/FashionMNIST/raw are found from ROOT and loaded as written."""
    raw = tmp_path / "FashionMNIST" / "raw"
    arrays = make_fashion(raw, gz=False)
    files = fm.find_files(tmp_path)
    assert files is not None and {p.parent for p in files.values()} == {raw}
    for split in ("train", "test"):
        x, y = fm.load_split(files, split)
        assert np.array_equal(x[:, 0].numpy(), arrays[split][0])
        assert np.array_equal(y.numpy(), arrays[split][1].astype(np.int64))
    b = build_data(load_cfg("fashion_mnist", root=str(tmp_path), download=False), global_batch=8, device=CPU)
    assert (b.num_train, b.num_eval) == (40, 20)


def test_fashion_missing_root(tmp_path):
    with pytest.raises(DataError) as e:
        build_data(load_cfg("fashion_mnist", root=str(tmp_path / "nope"), download=False), global_batch=8, device=CPU)
    assert_one_line_with_fix(
        e, "fashion_mnist: no files in", "dataset-fashion-mnist", "data.root", "data.download=true"
    )


@pytest.mark.parametrize("damage", ["truncated_gz", "bad_magic", "short_payload", "label_range", "count_mismatch"])
def test_fashion_corrupt_files(tmp_path, damage):
    make_fashion(tmp_path, gz=damage != "short_payload")
    name = fm.FILES["train_images"]
    if damage == "truncated_gz":
        p = tmp_path / (name + ".gz")
        p.write_bytes(p.read_bytes()[:200])
    elif damage == "bad_magic":
        write_idx(tmp_path / name, np.zeros((40, 28, 28), np.uint8), 0x00000801, gz=True)
    elif damage == "short_payload":
        p = tmp_path / name
        p.write_bytes(p.read_bytes()[:-5])
    elif damage == "label_range":
        write_idx(tmp_path / fm.FILES["train_labels"], np.full(40, 10, np.uint8), fm.LABEL_MAGIC, gz=True)
    else:
        write_idx(tmp_path / fm.FILES["train_labels"], np.zeros(39, np.uint8), fm.LABEL_MAGIC, gz=True)
    with pytest.raises(DataError) as e:
        build_data(load_cfg("fashion_mnist", root=str(tmp_path), download=False), global_batch=8, device=CPU)
    assert_one_line_with_fix(e, "fashion_mnist:", "data.root")


@pytest.mark.skipif(not HAVE_DEBIAN, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_debian_files():
    b = build_data(load_cfg("fashion_mnist"), global_batch=256, rank=1, world_size=2, device=CPU)
    assert (b.num_train, b.num_eval, b.num_classes, b.in_channels, b.image_size) == (60000, 10000, 10, 1, 28)
    assert b.train.images.shape == (60000, 1, 32, 32)  # stored zero-padded by crop_padding=2
    assert torch.equal(torch.bincount(b.train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(b.eval.labels), torch.full((10,), 1000))
    assert len(b.train) == 60000 // 256 and len(b.eval) == 5  # 5000 eval images on this rank, batches of 1000
    x, y = next(iter(b.train))
    assert x.shape == (128, 1, 28, 28)
    # normalized eval data is roughly zero-mean unit-variance with the config's constants
    ex = torch.cat([e[0] for e in b.eval])
    assert ex.shape == (5000, 1, 28, 28) and abs(ex.mean().item()) < 0.05 and abs(ex.std().item() - 1) < 0.05


# ----------------------------------------------------------------------------------------------- CIFAR


def make_cifar(root: Path, name: str, per_file=7, seed=0):
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, train, test, key, k = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
            10,
        )
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        folder, train, test, key, k = root / "cifar-100-python", ["train"], ["test"], b"fine_labels", 100
        meta = ("meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    folder.mkdir(parents=True)
    out = {}
    for split, files in (("train", train), ("test", test)):
        datas, labels = [], []
        for f in files:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            lab = rng.integers(0, k, per_file).tolist()
            entry = {b"batch_label": f.encode(), b"data": data, key: lab, b"filenames": [b"x.png"] * per_file}
            if name == "cifar100":
                entry[b"coarse_labels"] = [0] * per_file
            with open(folder / f, "wb") as fh:
                pickle.dump(entry, fh)
            datas.append(data)
            labels += lab
        out[split] = (np.concatenate(datas), np.array(labels))
    with open(folder / meta[0], "wb") as fh:
        pickle.dump(meta[1], fh)
    return folder, out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_round_trip(tmp_path, name):
    folder, out = make_cifar(tmp_path, name)
    from normbench.data import cifar

    for split in ("train", "test"):
        x, y = cifar.load_split(name, cifar.find_folder(name, tmp_path), split)
        data, labels = out[split]
        assert x.shape == (len(labels), 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(y, torch.from_numpy(labels).long())
        n, c, yy, xx = np.meshgrid(np.arange(len(labels)), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
        assert np.array_equal(x.numpy()[n, c, yy, xx], data[n, c * 1024 + yy * 32 + xx])
    n_train = 35 if name == "cifar10" else 7
    for root in (tmp_path, folder):  # the parent (torchvision's root) or the extracted folder itself
        b = build_data(load_cfg(name, root=str(root), download=False), global_batch=4, device=CPU)
        assert (b.num_train, b.num_eval, b.num_classes, b.in_channels, b.image_size) == (
            n_train,
            7,
            10 if name == "cifar10" else 100,
            3,
            32,
        )
        assert len(b.train) == n_train // 4
        ex = torch.cat([e[0] for e in b.eval])
        m = torch.tensor(list(load_cfg(name).mean)).view(1, 3, 1, 1)
        s = torch.tensor(list(load_cfg(name).std)).view(1, 3, 1, 1)
        ref = (torch.from_numpy(out["test"][0]).view(-1, 3, 32, 32).float() / 255 - m) / s
        torch.testing.assert_close(ex, ref, rtol=1e-6, atol=1e-5)


def test_cifar_world_size_determinism(tmp_path):
    make_cifar(tmp_path, "cifar10", per_file=10)
    cfg = load_cfg("cifar10", root=str(tmp_path), download=False)
    ref = collect(build_data(cfg, global_batch=8, seed=1, device=CPU).train, epoch=5)
    r0 = collect(build_data(cfg, global_batch=8, seed=1, rank=0, world_size=2, device=CPU).train, epoch=5)
    r1 = collect(build_data(cfg, global_batch=8, seed=1, rank=1, world_size=2, device=CPU).train, epoch=5)
    assert len(ref[0]) == 50 // 8
    for b in range(len(ref[0])):
        for r, got in enumerate((r0, r1)):
            assert torch.equal(got[0][b], ref[0][b][r::2]) and torch.equal(got[1][b], ref[1][b][r::2])


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_dict", "bad_shape"])
def test_cifar_errors(tmp_path, damage):
    folder, _ = make_cifar(tmp_path, "cifar10")
    target = folder / "data_batch_3"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "not_dict":
        target.write_bytes(pickle.dumps([1, 2, 3]))
    else:
        target.write_bytes(pickle.dumps({b"data": np.zeros((7, 100), np.uint8), b"labels": [0] * 7}))
    with pytest.raises(DataError) as e:
        build_data(load_cfg("cifar10", root=str(tmp_path), download=False), global_batch=4, device=CPU)
    assert_one_line_with_fix(e, "cifar10:", "data.root")
    if damage != "missing":
        assert "data_batch_3" in str(e.value)


@pytest.mark.gpu
def test_device_placement_cuda():
    dev = torch.device("cuda")
    b = build_data(load_cfg("synthetic", num_train=256, num_eval=64), global_batch=64, device=dev)
    x, y = next(iter(b.train))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
    cpu = build_data(load_cfg("synthetic", num_train=256, num_eval=64), global_batch=64, device=CPU)
    torch.testing.assert_close(x.cpu(), next(iter(cpu.train))[0])


def test_fashion_root_resolution_and_download(tmp_path, monkeypatch):
    """root unset: Debian dir, else the cache; a missing cache is filled via torchvision when download=true."""
    import torchvision.datasets

    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "normbench" / "fashion_mnist"
    with pytest.raises(DataError) as e:
        build_data(load_cfg("fashion_mnist", download=False), global_batch=8, device=CPU)
    assert_one_line_with_fix(e, str(tmp_path / "debian"), str(cache), "data.download=true")

    calls = []

    def fake_download(root, train=True, download=False):  # what torchvision leaves behind: root/FashionMNIST/raw
        calls.append((root, train, download))
        if not (Path(root) / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").exists():
            make_fashion(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    b = build_data(load_cfg("fashion_mnist"), global_batch=8, device=CPU)
    assert b.num_train == 40 and calls and calls[0] == (str(cache), True, True)
    calls.clear()
    build_data(load_cfg("fashion_mnist"), global_batch=8, device=CPU)
    assert not calls  # found in the cache now

    def failing(root, train=True, download=False):
        raise OSError("Name or service not known\nsecond line")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", failing)
    with pytest.raises(DataError) as e:
        build_data(load_cfg("fashion_mnist", root=str(tmp_path / "elsewhere")), global_batch=8, device=CPU)
    assert_one_line_with_fix(e, "download into", "failed", "data.root")

    make_fashion(tmp_path / "debian", gz=True, n_train=24)
    assert (
        build_data(load_cfg("fashion_mnist"), global_batch=8, device=CPU).num_train == 24
    )  # Debian wins over the cache


def test_group_files_compose_with_hydra(tmp_path):
    """The data group files compose under Hydra (struct mode) and the result builds."""
    import shutil

    from hydra import compose, initialize_config_dir

    shutil.copytree(CONFIGS, tmp_path / "data")
    (tmp_path / "probe.yaml").write_text("defaults:\n  - data: synthetic\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        for name in EXTRA_KEYS:
            cfg = compose(config_name="probe", overrides=[f"data={name}", "data.train_subset=64"])
            assert OmegaConf.is_struct(cfg) and cfg.data.name == name
        cfg = compose(
            config_name="probe",
            overrides=["data.num_train=128", "data.augment.crop_padding=4", "data.augment.flip=true"],
        )
    b = build_data(cfg.data, global_batch=32, device=CPU)
    assert b.num_train == 128 and next(iter(b.train))[0].shape == (32, 3, 32, 32)


def test_epoch_size_takes_the_first_positions_of_each_epochs_order():
    """data.epoch_size: each short epoch is the first positions of that epoch's shuffled order of the WHOLE set
    (labels are the image indices here)."""
    x, y = index_dataset()
    train = build_device_loaders(
        "t",
        x,
        y,
        x,
        y,
        padding=0,
        flip=False,
        mean=MEAN,
        std=STD,
        eval_batch=10,
        global_batch=8,
        rank=0,
        world_size=1,
        seed=5,
        device=CPU,
        epoch_size=40,
    )
    assert len(train[0]) == 40 // 8
    full = build_device_loaders(
        "t",
        x,
        y,
        x,
        y,
        padding=0,
        flip=False,
        mean=MEAN,
        std=STD,
        eval_batch=10,
        global_batch=8,
        rank=0,
        world_size=1,
        seed=5,
        device=CPU,
    )[0]
    seen = []
    for epoch in range(4):
        labels = torch.cat(collect(train[0], epoch)[1])
        assert labels.unique().numel() == 40  # no image twice
        assert torch.equal(labels, torch.cat(collect(full, epoch)[1])[:40])  # the full epoch's first positions
        seen.append(labels)
    assert not torch.equal(seen[0], seen[1])
    assert torch.cat(seen).unique().numel() > 60  # drawn from the whole set, not from a fixed first 40
    with pytest.raises(DataError) as err:
        build_data(
            load_cfg("synthetic", num_train=100, num_eval=10, image_size=8, epoch_size=4),
            global_batch=8,
            seed=5,
            device=CPU,
        )
    assert_one_line_with_fix(err, "epoch_size")
