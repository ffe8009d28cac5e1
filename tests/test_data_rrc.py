"""Random-resized crop on device-resident images (data.augment.rrc_scale), held against torchvision:
``RandomResizedCrop.get_params`` for the box rule and ``transforms.v2.functional.resized_crop`` for the pixels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from normbench.data import DataError, build_data
from normbench.data.common import epoch_permutation
from normbench.data.device_loader import build_device_loaders, draw_rrc_params, resized_crop_flip

CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def reference_resized_crop(x, top, left, h, w, fl):
    """Per image: torchvision's resized_crop (bilinear, float input so no uint8 rounding) then flip."""
    out = []
    for b in range(x.shape[0]):
        img = TF.resized_crop(
            x[b].float(),
            int(top[b]),
            int(left[b]),
            int(h[b]),
            int(w[b]),
            list(x.shape[-2:]),
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=True,
        )
        out.append(TF.horizontal_flip(img) if bool(fl[b]) else img)
    return torch.stack(out)


@pytest.mark.parametrize("c,hh,ww", [(1, 28, 28), (3, 32, 32), (2, 13, 21)])
def test_pixels_match_torchvision_resized_crop(c, hh, ww):
    g = torch.Generator().manual_seed(c)
    x = torch.randint(0, 256, (40, c, hh, ww), generator=g, dtype=torch.uint8)
    top, left, h, w, fl = draw_rrc_params(40, hh, ww, SCALE, RATIO, True, seed=7, epoch=c)
    assert fl.any() and (~fl).any() and (h < hh).any() and (w < ww).any()
    got = resized_crop_flip(x, top, left, h, w, fl, hh, ww)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, reference_resized_crop(x, top, left, h, w, fl), rtol=0, atol=2e-3)  # of 255


def test_whole_image_box_is_the_identity():
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    full = torch.full((3,), 28)
    zero = torch.zeros(3, dtype=torch.long)
    got = resized_crop_flip(x, zero, zero, full, full, torch.tensor([False, True, False]), 28, 28)
    assert torch.equal(got[0], x[0].float()) and torch.equal(got[1], x[1].float().flip(-1))


def test_boxes_in_bounds_with_torchvisions_distribution():
    """Boxes stay inside the image; area fraction and log aspect ratio follow torchvision's get_params
    (means and quantiles over many draws, within a few standard errors)."""
    n, hh, ww = 20000, 28, 28
    top, left, h, w, fl = draw_rrc_params(n, hh, ww, SCALE, RATIO, True, seed=0, epoch=0)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= hh).all() and (left + w <= ww).all()
    assert (h >= 1).all() and (w >= 1).all()
    torch.manual_seed(0)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, hh, ww), list(SCALE), list(RATIO)) for _ in range(n)]
    )
    ours = torch.stack([top, left, h, w], 1)
    for stat in (
        lambda b: (b[:, 2] * b[:, 3]).double() / (hh * ww),  # area fraction
        lambda b: torch.log(b[:, 3].double() / b[:, 2].double()),  # log aspect ratio (w/h)
        lambda b: b[:, 0].double() + b[:, 2] / 2,
    ):  # vertical box centre
        a, r = stat(ours), stat(ref)
        se = math.sqrt(a.var() / n + r.var() / n)
        assert abs(a.mean() - r.mean()) < 4 * se, (a.mean(), r.mean(), se)
        q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        torch.testing.assert_close(
            torch.quantile(a, q), torch.quantile(r, q), rtol=0, atol=0.05 * float(r.std()) + 1e-9
        )
    area = (h * w).double() / (hh * ww)
    # rounding the sides to integers can leave the scale range by a fraction of a pixel row
    assert area.min() > 0.06 and area.max() <= 1.0
    assert abs(fl.double().mean() - 0.5) < 4 * 0.5 / math.sqrt(n)


def test_fallback_is_torchvisions_centre_crop():
    """No try can fit (ratio far from the image's): the whole-image centre crop clipped to the ratio range."""
    top, left, h, w, _ = draw_rrc_params(5, 28, 28, (1.0, 1.0), (2.0, 3.0), False, seed=1, epoch=0)
    ref = RandomResizedCrop.get_params(torch.empty(1, 28, 28), [1.0, 1.0], [2.0, 3.0])
    for b in range(5):
        assert (int(top[b]), int(left[b]), int(h[b]), int(w[b])) == tuple(ref)


def make_train(x, y, *, G, rank=0, ws=1, seed=3):
    return build_device_loaders(
        "t",
        x,
        y,
        x,
        y,
        padding=0,
        flip=True,
        mean=[0.5],
        std=[0.25],
        eval_batch=10,
        global_batch=G,
        rank=rank,
        world_size=ws,
        seed=seed,
        device=CPU,
        rrc_scale=SCALE,
        rrc_ratio=RATIO,
    )[0]


def collect(loader, epoch):
    loader.set_epoch(epoch)
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_loader_applies_the_positions_boxes_and_is_world_size_free():
    """Batch b of epoch e = the epoch order's images at positions b*G.., each with its position's box; rank r of
    ws gets positions r, r+ws, ... of the same global batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 10, 10), generator=g, dtype=torch.uint8)
    y = torch.arange(50)
    G, seed, epoch = 8, 3, 2
    full = collect(make_train(x, y, G=G, seed=seed), epoch)
    perm = epoch_permutation(50, seed, epoch)
    top, left, h, w, fl = draw_rrc_params(50, 10, 10, SCALE, RATIO, True, seed, epoch)
    for b, (xb, yb) in enumerate(full):
        pos = slice(b * G, (b + 1) * G)
        assert torch.equal(yb, perm[pos])
        ref = (reference_resized_crop(x[perm[pos]], top[pos], left[pos], h[pos], w[pos], fl[pos]) / 255 - 0.5) / 0.25
        torch.testing.assert_close(xb, ref, rtol=0, atol=1e-4)
    ranks = [collect(make_train(x, y, G=G, rank=r, ws=2, seed=seed), epoch) for r in range(2)]
    for b, (xb, yb) in enumerate(full):
        for r in range(2):
            assert torch.equal(ranks[r][b][1], yb[r::2])
            torch.testing.assert_close(ranks[r][b][0], xb[r::2], rtol=0, atol=1e-5)
    other = collect(make_train(x, y, G=G, seed=seed), epoch + 1)
    assert not torch.equal(torch.cat([b[0] for b in other]), torch.cat([b[0] for b in full]))


def test_config_path_and_bad_settings_fail_in_one_line():
    cfg = OmegaConf.load(CONFIGS / "synthetic.yaml")
    assert cfg.augment.rrc_scale is None  # the padded crop stays the default everywhere
    for name in ("fashion_mnist", "cifar10", "cifar100"):
        assert OmegaConf.load(CONFIGS / f"{name}.yaml").augment.rrc_scale is None
    OmegaConf.update(cfg, "num_train", 64)
    OmegaConf.update(cfg, "image_size", 12)
    OmegaConf.update(cfg, "augment.rrc_scale", [0.08, 1.0])
    OmegaConf.set_struct(cfg, True)
    bundle = build_data(cfg, global_batch=16, device=CPU)
    assert bundle.train.rrc == (SCALE, (0.75, 1.3333333))
    xb, _ = next(iter(bundle.train))
    assert xb.shape == (16, 3, 12, 12)
    for key, value, needle in [
        ("augment.crop_padding", 2, "crop_padding=0"),
        ("augment.rrc_scale", [0.5, 1.5], "rrc_scale"),
        ("augment.rrc_scale", [0.5], "rrc_scale"),
    ]:
        bad = OmegaConf.load(CONFIGS / "synthetic.yaml")
        OmegaConf.update(bad, "augment.rrc_scale", [0.08, 1.0])
        OmegaConf.update(bad, key, value, merge=False)
        with pytest.raises(DataError) as err:
            build_data(bad, global_batch=16, device=CPU)
        msg = str(err.value)
        assert "\n" not in msg and needle in msg, msg
