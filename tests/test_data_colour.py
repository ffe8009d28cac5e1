"""ImageNet's colour jitter and PCA lighting (normbench.data.colour) against fb.resnet.torch's formulas, written
here in float64 from docs/papers.md section 2 and applied to generated images with the same random draws; then
both decoders end to end (decoded on the CPU), their determinism, the run id and the config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from normbench.data import DataError, build_data
from normbench.data.colour import ColourAugment, ColourTransform, apply, draw
from normbench.data.common import STREAM_AUGMENT, epoch_generator, epoch_permutation
from normbench.data.gpu_decode import draw_crops

from conftest import compose, imagenet_cfg

CPU = torch.device("cpu")
D = torch.float64
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=D).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=D).view(1, 3, 1, 1)
# docs/papers.md section 2 (fb.resnet.torch datasets/imagenet.lua), typed in here rather than imported
EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045], dtype=D)
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], dtype=D)
OFFICIAL = dict(brightness=0.4, contrast=0.4, saturation=0.4, lighting=0.1)
OFF = {"augment.brightness": 0, "augment.contrast": 0, "augment.saturation": 0, "augment.lighting": 0}


def gray(img: torch.Tensor) -> torch.Tensor:
    return 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]


def blend(img, other, alpha):
    return img * alpha + other * (1 - alpha)


def reference(img: torch.Tensor, strengths: dict, order, u, n) -> torch.Tensor:
    """fb.resnet.torch's ColorJitter (RandomOrder over brightness, contrast, saturation) then Lighting, in
    float64 on a (3, H, W) image in [0, 1], from the uniform draws ``u`` (one per jitter, in [0, 1)), the
    permutation ``order`` and the standard normal draws ``n``."""
    img = img.to(D).clone()
    names = ("brightness", "contrast", "saturation")
    for k in order:
        alpha = 1 + (-strengths[names[k]] + 2 * strengths[names[k]] * u[k])  # 1 + U(-s, s)
        if names[k] == "brightness":
            img = blend(img, torch.zeros_like(img), alpha)
        elif names[k] == "contrast":
            img = blend(img, torch.full_like(img, gray(img).mean().item()), alpha)
        else:
            img = blend(img, gray(img).expand(3, -1, -1), alpha)
    alpha = torch.tensor(n, dtype=D) * strengths["lighting"]
    rgb = (EIGVEC * alpha.view(1, 3) * EIGVAL.view(1, 3)).sum(1)
    return img + rgb.view(3, 1, 1)


def colour_draws(seed: int, size: tuple[int, int] | None = None):
    """The colour draws as both decoders make them: the CPU generator seeded with the image's seed; for an image
    of ``size`` (H, W) first the crop's draws (torchvision's RandomResizedCrop, area 0.08-1) and the flip's
    (``rand(1)``); then randperm(3), rand(3) and randn(3) in float64."""
    from torchvision.transforms import RandomResizedCrop

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size is not None:
            RandomResizedCrop.get_params(torch.empty(1, *size), [0.08, 1.0], [3 / 4, 4 / 3])
            torch.rand(1)
        order = torch.randperm(3).tolist()
        u = torch.rand(3, dtype=D).tolist()
        n = torch.randn(3, dtype=D).tolist()
    return order, u, n


def picture(seed: int, h=20, w=24) -> torch.Tensor:
    """Colourful gradients plus noise in [0, 1] (float32), different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 1 - (xx + yy) / (h + w)]) * rng.uniform(0.3, 0.9, (3, 1, 1))
    return torch.from_numpy(np.clip(base + rng.normal(0, 0.08, (3, h, w)), 0, 1)).float()


# ----------------------------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize(
    "strengths",
    [
        OFFICIAL,
        dict(brightness=0.4, contrast=0, saturation=0, lighting=0),
        dict(brightness=0, contrast=0.7, saturation=0, lighting=0),
        dict(brightness=0, contrast=0, saturation=1.0, lighting=0),
        dict(brightness=0, contrast=0, saturation=0, lighting=0.5),
        dict(brightness=0.2, contrast=0.9, saturation=0.3, lighting=0),
    ],
)
def test_one_image_matches_the_float64_formulas(strengths):
    colour = ColourAugment(**strengths)
    jitter = any(strengths[k] for k in ("brightness", "contrast", "saturation"))
    for seed in range(12):  # 12 draws: every one of the 6 orders is likely met with the official strengths
        img = picture(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + seed)
            got = ColourTransform(colour)(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + seed)
            order = torch.randperm(3).tolist() if jitter else [0, 1, 2]
            u = torch.rand(3, dtype=D).tolist() if jitter else [0.5] * 3
            n = torch.randn(3, dtype=D).tolist() if strengths["lighting"] else [0.0] * 3
        ref = reference(img, strengths, order, u, n)
        assert got.dtype == torch.float32 and got.shape == img.shape
        assert (got.double() - ref).abs().max() < 2e-6, (seed, order)
        assert (ref - img.double()).abs().max() > 1e-3  # the augmentation did something


def test_the_three_blends_commute_so_the_order_is_fidelity_not_effect():
    """Why a mistaken order would pass the test above: grey weights summing to 1, saturation keeps an image's
    grey and every blend is linear, so without clamping any order gives the same image (docs/papers.md
    section 2). The order is still drawn and applied, as fb.resnet.torch does, so the draws stay its draws."""
    img = picture(3)
    u, n = [0.1, 0.9, 0.3], [0.0] * 3
    results = [reference(img, OFFICIAL, order, u, n) for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1])]
    assert all((r - results[0]).abs().max() < 1e-12 for r in results)


@pytest.mark.parametrize("matmul", [True, False], ids=["cpu_matmul", "cuda_broadcast"])
def test_a_batch_gets_each_images_own_draws(matmul):
    """The gpu path's batched apply (both of its forms, on the CPU): every image of a batch with its own order
    and factors, as one at a time."""
    imgs = [picture(s) for s in range(8)]
    seeds = [7 * s + 3 for s in range(8)]
    draws = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draws.append(draw(ColourAugment(**OFFICIAL)))
    got = apply(torch.stack(imgs), draws, matmul=matmul)
    orders = set()
    for img, seed, out in zip(imgs, seeds, got):
        order, u, n = colour_draws(seed)
        orders.add(tuple(order))
        assert (out.double() - reference(img, OFFICIAL, order, u, n)).abs().max() < 2e-6
    assert len(orders) > 1  # the batch really mixes orders


def test_off_draws_nothing_and_is_the_identity():
    img = picture(0)
    state = torch.get_rng_state()
    assert draw(ColourAugment()) is None and torch.equal(ColourTransform(ColourAugment())(img), img)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_strengths_are_one_line_naming_the_key_and_the_fix():
    for key, value in (("brightness", 1.5), ("saturation", -0.1), ("lighting", -1), ("contrast", "a lot")):
        with pytest.raises(DataError) as err:
            ColourAugment.from_config("imagenet", {key: value})
        msg = str(err.value)
        assert "\n" not in msg and f"data.augment.{key}=" in msg and "e.g." in msg and "0 to turn it off" in msg
    from normbench.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"^data\.augment\.contrast=1\.5 is not valid: .* in \[0, 1\]"):
        validate(OmegaConf.to_container(compose(["data=imagenet", "data.augment.contrast=1.5"]), resolve=True))
    with pytest.raises(ConfigError, match=r"^data\.augment\.lighting=-0\.1 is not valid"):
        validate(OmegaConf.to_container(compose(["data=imagenet", "data.augment.lighting=-0.1"]), resolve=True))


# ----------------------------------------------------------------------------------------------- both decoders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train: 2 classes x 4 RGB 4:4:4 JPEGs (sizes 30x36 and 36x30), val: 2 x 1."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 1)):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = (30, 36) if i % 2 else (36, 30)
                arr = (picture(int(rng.integers(1 << 30)), h, w).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{cls}_{i}.JPEG", quality=95, subsampling=0)
    return root


def make(root, decoder, seed=0, G=4, rank=0, ws=1, device=CPU, **overrides):
    cfg = imagenet_cfg(
        **{"root": str(root), "workers": 0, "image_size": 16, "eval_batch": 2, "decoder": decoder, **overrides}
    )
    return build_data(cfg, global_batch=G, rank=rank, world_size=ws, seed=seed, device=device)


def epoch(loader, e):
    loader.set_epoch(e)
    return torch.cat([x for x, _ in loader])


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized batch -> pixels (float64, not clamped: the augmentation does not clamp)."""
    return x.double() * STD + MEAN


@pytest.mark.parametrize(
    "decoder, device", [("pil", "cpu"), ("gpu", "cpu"), pytest.param("gpu", "cuda", marks=pytest.mark.gpu)]
)
def test_each_decoder_applies_the_formulas_with_each_positions_draws(folder, decoder, device):
    """Per position the crop-and-flip-only output of the same seed, put through the float64 formulas with the
    draws that follow that position's crop and flip draws, is the official recipe's output (decoder=gpu batched
    on the device)."""
    seed, e, dev = 5, 1, torch.device(device)
    on = pixels(epoch(make(folder, decoder, seed, device=dev).train, e).cpu())
    off = pixels(epoch(make(folder, decoder, seed, device=dev, **OFF).train, e).cpu())
    files = [p for p, _ in make(folder, decoder, seed).train.loader.dataset.folder.samples]
    perm = epoch_permutation(len(files), seed, e).tolist()
    seeds = torch.randint(0, 2**62, (len(files),), generator=epoch_generator(seed, e, STREAM_AUGMENT)).tolist()
    for pos in range(len(on)):
        order, u, n = colour_draws(seeds[pos], Image.open(files[perm[pos]]).size[::-1])
        ref = reference(off[pos], OFFICIAL, order, u, n)
        assert (on[pos] - ref).abs().max() < 1e-5, (decoder, pos)


def test_the_gpu_paths_draws_follow_the_crop_and_flip_and_leave_the_boxes_alone(folder):
    colour = ColourAugment(**OFFICIAL)
    sizes, seeds = [(36, 30), (30, 36)] * 4, list(range(100, 108))
    draws = draw_crops(sizes, seeds, (0.08, 1.0), (3 / 4, 4 / 3), flip=True, colour=colour)
    plain = draw_crops(sizes, seeds, (0.08, 1.0), (3 / 4, 4 / 3), flip=True)
    for d, p, (h, w), seed in zip(draws, plain, sizes, seeds):
        assert tuple(d[:5]) == tuple(p[:5])  # the colour draws come after the crop's: the same boxes as before
        order, u, n = colour_draws(seed, (h, w))
        assert list(d.colour.order) == order
        factors = [1 + OFFICIAL[k] * (2 * v - 1) for k, v in zip(("brightness", "contrast", "saturation"), u)]
        assert np.allclose(d.colour.factors, factors, rtol=0, atol=1e-12)
        shift = EIGVEC @ (0.1 * torch.tensor(n, dtype=D) * EIGVAL)
        assert np.allclose(d.colour.shift, shift.tolist(), rtol=0, atol=1e-12)


def test_the_decoders_agree_with_the_colour_on(folder):
    pil, gpu = pixels(epoch(make(folder, "pil", 3).train, 0)), pixels(epoch(make(folder, "gpu", 3).train, 0))
    assert (pil - gpu).abs().mean(dim=(1, 2, 3)).max() < 3 / 255  # resampling rounding, through the jitter


@pytest.mark.parametrize("decoder", ["pil", "gpu"])
def test_colour_does_not_depend_on_world_size_or_workers(folder, decoder):
    ref = epoch(make(folder, decoder, 7).train, 2)
    assert torch.equal(epoch(make(folder, decoder, 7, workers=2).train, 2), ref)
    full = ref.view(-1, 4, *ref.shape[1:])  # global batches of 4
    for r in range(2):  # rank r of 2 takes positions r, r+2 of each global batch
        loader = make(folder, decoder, 7, rank=r, ws=2).train
        loader.set_epoch(2)
        assert all(torch.equal(x, full[k][r::2]) for k, (x, _) in enumerate(loader)), r


def test_off_is_the_crop_and_flip_pipeline_as_before(folder):
    """All four strengths 0: exactly torchvision's RandomResizedCrop + flip + ToTensor + Normalize with the
    position's seed, the pipeline of every run made before the colour keys existed."""
    from torchvision import transforms as T

    seed, e = 2, 0
    got = epoch(make(folder, "pil", seed, **OFF).train, e)
    files = [p for p, _ in make(folder, "pil", seed).train.loader.dataset.folder.samples]
    perm = epoch_permutation(len(files), seed, e).tolist()
    seeds = torch.randint(0, 2**62, (len(files),), generator=epoch_generator(seed, e, STREAM_AUGMENT)).tolist()
    tf = T.Compose(
        [
            T.RandomResizedCrop(16, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    for pos in range(len(got)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds[pos])
            assert torch.equal(got[pos], tf(Image.open(files[perm[pos]]).convert("RGB"))), pos


# ----------------------------------------------------------------------------------------------- identity


def test_colour_is_in_the_run_id_and_off_keeps_old_ids():
    from normbench.data.colour import KEYS
    from normbench.runs import COLOUR_AUGMENT_KEYS, run_id

    assert COLOUR_AUGMENT_KEYS == KEYS  # normbench.runs does not import the data layer: its own copy

    def config(**augment):
        data = {"name": "imagenet", "image_size": 224, "augment": {"min_scale": 0.08, "flip": True, **augment}}
        return {"seed": 0, "data": data, "norm": {"name": "gn"}}

    old = run_id(config())  # a run recorded before the colour keys existed
    assert run_id(config(brightness=0, contrast=0.0, saturation=0, lighting=0)) == old
    assert run_id(config(**OFFICIAL)) != old
    assert run_id(config(**{**OFFICIAL, "lighting": 0})) not in (old, run_id(config(**OFFICIAL)))


def test_presets_official_and_crop_flip():
    official = OmegaConf.to_container(compose(["preset=imagenet"]), resolve=True)["data"]["augment"]
    assert {k: official[k] for k in OFFICIAL} == OFFICIAL
    plain = OmegaConf.to_container(compose(["preset=imagenet_crop_flip"]), resolve=True)
    assert plain["preset_name"] == "imagenet_crop_flip" and plain["data"]["name"] == "imagenet"
    assert all(plain["data"]["augment"][k] == 0 for k in OFFICIAL)
    assert plain["data"]["augment"]["flip"] is True and plain["data"]["augment"]["min_scale"] == 0.08
