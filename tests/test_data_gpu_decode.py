"""data.decoder=gpu (normbench.data.gpu_decode) against the PIL path and PIL itself, on a generated ImageNet-layout
folder (train/<class>/*.JPEG, val/<class>/*.JPEG) holding RGB, grayscale and CMYK JPEGs and a PNG named .JPEG.
On the CPU the gpu decoder runs the same code (torchvision.io.decode_jpeg decodes on the CPU); `gpu`-marked tests
repeat the comparisons on CUDA (nvJPEG) and skip without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normbench.data import DataError, build_data
from normbench.data.common import STREAM_AUGMENT, epoch_generator, epoch_permutation
from normbench.data.gpu_decode import decode_batch, draw_crops

from conftest import imagenet_cfg

CPU = torch.device("cpu")
CLASSES = ("n01", "n02")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TOL = 2 / 255  # mean |difference| of pixels in [0, 1]: JPEG decoders and resamplers round differently


def picture(rng, h, w, k):
    """Smooth colour gradients plus noise, class-dependent tint: JPEG-like content with detail at every scale."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * 200
    base[..., k] += 40
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


SUBSAMPLED = {("train", 0, 0), ("train", 1, 0), ("val", 0, 2), ("val", 1, 2)}  # 4:2:0 chroma, the others 4:4:4


def write_folder(root: Path) -> Path:
    """train: 2 classes x 6 images, val: 2 x 3, sizes 40x56 / 56x40 / 48x48; one grayscale JPEG, one CMYK JPEG
    and one PNG saved under a .JPEG name (as in ImageNet's train set). The RGB JPEGs are 4:4:4 but for the
    SUBSAMPLED ones (4:2:0, as most of ImageNet): nvJPEG upsamples chroma without libjpeg's smoothing filter, so
    on CUDA only 4:4:4 and grayscale files decode (almost) exactly as PIL does."""
    rng = np.random.default_rng(0)
    sizes = ((40, 56), (56, 40), (48, 48))
    for split, n in (("train", 6), ("val", 3)):
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = sizes[i % 3]
                img = Image.fromarray(picture(rng, h, w, k))
                path = d / f"{cls}_{i}.JPEG"
                if (split, k, i) in (("train", 0, 1), ("val", 1, 0)):
                    img.convert("L").save(path, quality=90)
                elif (split, k, i) == ("train", 1, 2):
                    img.convert("CMYK").save(path, quality=90)
                elif (split, k, i) == ("train", 1, 4):
                    img.save(path, format="PNG")
                else:
                    img.save(path, quality=90, subsampling=2 if (split, k, i) in SUBSAMPLED else 0)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imagenet"))


def make(root, decoder, G=4, rank=0, ws=1, seed=0, device=CPU, **overrides):
    cfg = imagenet_cfg(
        **{"root": str(root), "workers": 0, "image_size": 32, "eval_batch": 4, "decoder": decoder, **overrides}
    )
    return build_data(cfg, global_batch=G, rank=rank, world_size=ws, seed=seed, device=device)


def collect(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    out = [(x.cpu(), y.cpu()) for x, y in loader]
    return [x for x, _ in out], [y for _, y in out]


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized batch -> pixels in [0, 1] (float64)."""
    return (x.double() * STD.double() + MEAN.double()).clamp(0, 1)


def pil_rgb(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def all_files(root):
    return sorted(p for p in root.rglob("*.JPEG"))


# ----------------------------------------------------------------------------------------------- decoding


def test_decode_matches_pil_including_gray_cmyk_and_png(folder):
    files = all_files(folder)
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    decoded = decode_batch(datas, [str(p) for p in files], CPU, "imagenet")
    for path, got in zip(files, decoded):
        ref = pil_rgb(path)
        assert got.dtype == torch.uint8 and got.shape == ref.shape, path
        assert (got.double() - ref.double()).abs().mean() / 255 < TOL, path
    gray = folder / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG"
    assert Image.open(gray).mode == "L"
    g = decoded[files.index(gray)]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grey replicated to 3 channels


# ----------------------------------------------------------------------------------------------- augmentation


def test_crop_boxes_are_the_pil_paths_draws(folder):
    """Per position p of epoch e the PIL path seeds the CPU RNG with seeds[p] (common.py's rule) and runs
    RandomResizedCrop then RandomHorizontalFlip on the PIL image; draw_crops must give the same box and flip."""
    from torchvision import transforms as T

    files = sorted((folder / "train").rglob("*.JPEG"))
    seeds = torch.randint(0, 2**62, (len(files),), generator=epoch_generator(5, 2, STREAM_AUGMENT)).tolist()
    sizes = [Image.open(p).size[::-1] for p in files]
    got = draw_crops(sizes, seeds, (0.08, 1.0), (3 / 4, 4 / 3), flip=True)
    flips = []
    for path, seed, params in zip(files, seeds, got):
        torch.manual_seed(seed)
        box = T.RandomResizedCrop.get_params(Image.open(path), [0.08, 1.0], [3 / 4, 4 / 3])
        flips.append(bool(torch.rand(1) < 0.5))
        assert tuple(params[:5]) == (*box, flips[-1]) and params.colour is None, path
    assert 0 < sum(flips) < len(flips)
    no_flip = draw_crops(sizes, seeds, (0.08, 1.0), (3 / 4, 4 / 3), flip=False)
    assert [p[:4] for p in no_flip] == [p[:4] for p in got] and not any(p[4] for p in no_flip)


CROP_FLIP = {f"augment.{k}": 0 for k in ("brightness", "contrast", "saturation", "lighting")}


@pytest.mark.parametrize("colour", ["crop_flip", "official"])
def test_train_batches_match_the_pil_path(folder, colour):
    """The same crops, flips and (official) colour jitter and lighting from both decoders."""
    off = CROP_FLIP if colour == "crop_flip" else {}
    pil, gpu = make(folder, "pil", seed=3, **off), make(folder, "gpu", seed=3, **off)
    px, py = collect(pil.train, 1)
    gx, gy = collect(gpu.train, 1)
    assert len(gx) == len(px) == 3
    for a, b in zip(py, gy):
        assert torch.equal(a, b)  # same labels in the same order
    for a, b in zip(px, gx):
        assert a.shape == b.shape == (4, 3, 32, 32) and b.dtype == torch.float32
        per_image = (pixels(a) - pixels(b)).abs().mean(dim=(1, 2, 3))
        assert per_image.max() < TOL, per_image  # the same crop box and flip, resampled alike
    # ... and the tolerance tells crops apart: another epoch's crops of the same images are far off
    other_x, _ = collect(pil.train, 2)
    far = (pixels(torch.cat(other_x)) - pixels(torch.cat(gx))).abs().mean(dim=(1, 2, 3))
    assert far.min() > 3 * TOL or far.mean() > 5 * TOL
    # normalized batch statistics agree
    allp, allg = torch.cat(px).double(), torch.cat(gx).double()
    assert (allp.mean((0, 2, 3)) - allg.mean((0, 2, 3))).abs().max() < 0.02
    assert (allp.std((0, 2, 3)) / allg.std((0, 2, 3)) - 1).abs().max() < 0.02


def test_eval_batches_match_the_pil_path_and_resize_center_crop(folder):
    from torchvision.transforms import functional as TF

    px, py = collect(make(folder, "pil").eval)
    gx, gy = collect(make(folder, "gpu").eval)
    assert torch.equal(torch.cat(py), torch.cat(gy)) and torch.equal(torch.cat(gy), torch.tensor([0] * 3 + [1] * 3))
    diff = (pixels(torch.cat(px)) - pixels(torch.cat(gx))).abs().mean(dim=(1, 2, 3))
    assert diff.max() < TOL, diff
    # by hand: Resize(37) of the shorter side + CenterCrop(32), with PIL, on the grayscale val image
    gray = sorted((folder / "val" / CLASSES[1]).iterdir())[0]
    ref = TF.to_tensor(TF.center_crop(TF.resize(Image.open(gray).convert("RGB"), 37), 32)).double()
    assert (pixels(torch.cat(gx)[3:4])[0] - ref).abs().mean() < TOL


# ----------------------------------------------------------------------------------------------- determinism


def test_workers_world_size_and_rng_do_not_change_the_data(folder):
    ref_x, ref_y = collect(make(folder, "gpu", seed=7).train, 2)
    loader = make(folder, "gpu", seed=7, workers=2).train
    for epoch in (2, 2):  # persistent workers, the same epoch twice
        got_x, got_y = collect(loader, epoch)
        assert all(torch.equal(u, v) for u, v in zip(got_x + got_y, ref_x + ref_y))
    ranks = [collect(make(folder, "gpu", G=4, rank=r, ws=2, seed=7).train, 2) for r in range(2)]
    for b in range(3):  # rank r takes positions r, r+2, ... of each global batch
        for r in range(2):
            assert torch.equal(ranks[r][0][b], ref_x[b][r::2]) and torch.equal(ranks[r][1][b], ref_y[b][r::2])
    # the epoch's order is common.py's permutation
    files = [p for p, _ in make(folder, "gpu").train.loader.dataset.folder.samples]
    labels = torch.tensor([0 if f"/{CLASSES[0]}/" in p else 1 for p in files])
    assert torch.equal(torch.cat(ref_y), labels[epoch_permutation(12, 7, 2)])
    state = torch.get_rng_state()
    again = collect(make(folder, "gpu", seed=7).train, 2)
    assert torch.equal(torch.get_rng_state(), state), "the gpu path must not consume the trainer's RNG stream"
    assert all(torch.equal(u, v) for u, v in zip(again[0], ref_x))


# ----------------------------------------------------------------------------------------------- errors, identity


@pytest.mark.parametrize("how", ["truncated", "not_an_image", "empty"])
def test_a_corrupt_file_is_named_in_one_line(folder, tmp_path, how):
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "train" / CLASSES[1] / f"{CLASSES[1]}_3.JPEG"
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[:200], "not_an_image": b"<html>not found</html>", "empty": b""}[how])
    loader = make(root, "gpu", G=12).train  # one batch holds every image
    with pytest.raises(DataError) as err:
        collect(loader, 0)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "replace or remove" in msg, msg


def test_a_bad_decoder_is_one_line_naming_the_choices(folder):
    with pytest.raises(DataError) as err:
        make(folder, "foo")
    msg = str(err.value)
    assert "\n" not in msg and "data.decoder='foo'" in msg and "pil, gpu" in msg


def test_the_gpu_decoder_is_its_own_run_and_pil_keeps_old_ids():
    from normbench.runs import run_id

    def config(**data):
        return {"seed": 0, "data": {"name": "imagenet", "image_size": 224, **data}, "norm": {"name": "gn"}}

    assert run_id(config(decoder="pil")) == run_id(config())  # runs made before data.decoder existed
    assert run_id(config(decoder="gpu")) != run_id(config(decoder="pil"))


# ----------------------------------------------------------------------------------------------- CUDA


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of a (3, H, W) image, float64: chroma upsampling does not enter it (up to clipping)."""
    r, g, b = rgb.double()
    return 0.299 * r + 0.587 * g + 0.114 * b


@pytest.mark.gpu
def test_cuda_decode_matches_pil(folder):
    files = all_files(folder)
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    decoded = decode_batch(datas, [str(p) for p in files], torch.device("cuda"), "imagenet")
    for path, got in zip(files, decoded):
        ref = pil_rgb(path)
        assert got.is_cuda and got.shape == ref.shape, path
        got = got.cpu()
        split, cls, i = path.parts[-3], path.parts[-2], int(path.stem.rsplit("_", 1)[1])
        if (split, CLASSES.index(cls), i) in SUBSAMPLED:  # chroma upsampled differently: luma within JPEG error
            assert (luma(got) - luma(ref)).abs().mean() / 255 < TOL, path
            assert (got.double() - ref.double()).abs().mean() / 255 < 8 * TOL, path
        else:
            assert (got.double() - ref.double()).abs().mean() / 255 < TOL, path


@pytest.mark.gpu
def test_cuda_batches_match_the_pil_path(folder):
    """The same labels, crop boxes and flips as the PIL path; pixels within 2/255 but for the 4:2:0 files. With
    the colour augmentation off: it amplifies the decoders' differences (its formulas on CUDA:
    test_data_colour.py)."""
    cuda = torch.device("cuda")
    for split, epoch in (("train", 1), ("eval", None)):
        px, py = collect(getattr(make(folder, "pil", seed=3, **CROP_FLIP), split), epoch)
        gx, gy = collect(getattr(make(folder, "gpu", seed=3, device=cuda, **CROP_FLIP), split), epoch)
        assert all(torch.equal(a, b) for a, b in zip(py, gy))
        diff = (pixels(torch.cat(px)) - pixels(torch.cat(gx))).abs().mean(dim=(1, 2, 3))
        assert diff.median() < TOL and diff.max() < 4 * TOL, (split, diff)
        assert (diff < TOL).sum() >= len(diff) - 2, (split, diff)  # 2 4:2:0 files per split


@pytest.mark.gpu
def test_cuda_corrupt_file_is_named(folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "train" / CLASSES[0] / f"{CLASSES[0]}_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="replace or remove") as err:
        collect(make(root, "gpu", G=12, device=torch.device("cuda")).train, 0)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_normbench_train_runs_with_the_gpu_decoder(folder, tmp_path):
    from conftest import TINY, cli

    args = [a for a in TINY if not a.startswith("data")]
    proc = cli(
        "train",
        *args,
        "data=imagenet",
        f"data.root={folder}",
        "data.image_size=16",
        "data.workers=0",
        "data.decoder=gpu",
        "gpus=2",
        "per_gpu_batch=2",
        "epochs=1",
        f"results_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(tmp_path.rglob("result.json"))
    assert len(results) == 1 and '"completed"' in results[0].read_text()
