#!/usr/bin/env python
"""ImageNet input pipeline throughput: decoded + augmented training images per second, per pipeline, in one run.

Pipelines: ``pil`` (data.decoder=pil: PIL decodes and augments in N DataLoader workers; one row per ``--workers``
value) and ``gpu`` (data.decoder=gpu: ``--gpu-workers`` workers read the file bytes, then one batched
``torchvision.io.decode_jpeg`` call and the crop/flip/resize/normalize run on ``--device``; on the CPU this is the
same code decoding on the CPU). Each pipeline is the real training loader of ``normbench train data=imagenet``
(``build_data``), so a batch is ready on the device, normalized, when it is counted. Per pipeline: a few warm-up
batches (worker start-up, CUDA/nvJPEG initialisation), then ``--repeats`` timed epochs (the device synchronized at
the end of each); the median is reported with its ratio to the fastest PIL row of the same augmentation.

``--augment``: ``crop_flip`` (random-resized crop + flip), ``official`` (plus fb.resnet.torch's colour jitter and
PCA lighting, configs/data/imagenet.yaml's default) or ``both`` (the default: every pipeline twice, and the
official recipe's images/s as a fraction of crop_flip's, its cost; the two alternate epoch by epoch).

Without ``--root`` the images are generated first into a temporary directory in ImageNet's layout
(train/<class>/*.JPEG): smooth colour gradients plus noise (JPEG-like content), ``--distinct`` different pictures
written under ``--images`` file names. They sit in the page cache, so disk reads are not measured; with
``--root`` a real ImageNet is read (the first ``--images`` training images in ImageFolder order).

    python scripts/bench_data.py                        # CPU, < 60 s: 256 320x240 JPEGs, batch 32, 112x112
    python scripts/bench_data.py --device cuda          # GPU: 4096 500x375 JPEGs, batch 256, 224x224, pil 8/16 w
    python scripts/bench_data.py --device cuda --root /data/imagenet --images 25600 --out results/benchmarks/
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from normbench.data import build_data  # noqa: E402
from normbench.paths import CONFIG_DIR  # noqa: E402
from scripts._bench_common import device_name, write_bench_outputs  # noqa: E402

DEFAULTS = {
    "cpu": dict(images=256, width=320, height=240, batch=32, image_size=112, workers="0,2", gpu_workers=1, repeats=3),
    "cuda": dict(
        images=4096, width=500, height=375, batch=256, image_size=224, workers="8,16", gpu_workers=4, repeats=3
    ),
}
CLASSES = 8
AUGMENTS = ("crop_flip", "official")
COLOUR_OFF = {"brightness": 0, "contrast": 0, "saturation": 0, "lighting": 0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--root", help="a real ImageNet (ImageFolder train/ and val/); default: generated JPEGs")
    ap.add_argument("--images", type=int, help="training images per epoch (default 256 cpu, 4096 cuda)")
    ap.add_argument("--width", type=int, help="generated JPEG width (default 320 cpu, 500 cuda)")
    ap.add_argument("--height", type=int, help="generated JPEG height (default 240 cpu, 375 cuda)")
    ap.add_argument("--distinct", type=int, default=64, help="different generated pictures (default 64)")
    ap.add_argument("--batch", type=int, help="images per batch (default 32 cpu, 256 cuda)")
    ap.add_argument("--image-size", type=int, help="output crop size (default 112 cpu, 224 cuda)")
    ap.add_argument("--workers", help="comma-separated DataLoader workers of the pil rows (default 0,2 / 8,16)")
    ap.add_argument("--gpu-workers", type=int, help="byte-reading workers of the gpu decoder (default 1 / 4)")
    ap.add_argument("--augment", choices=[*AUGMENTS, "both"], default="both", help="augmentation (default both)")
    ap.add_argument("--repeats", type=int, help="timed epochs per pipeline; the median is reported (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches per pipeline first (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default 1)")
    ap.add_argument("--out", help="write OUT.md and OUT.json (or into a directory: bench_data-<device>.*)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available; use --device cpu")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        args.worker_list = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        ap.error("--workers needs comma-separated integers, e.g. 0,2")
    if min(args.worker_list, default=-1) < 0 or args.gpu_workers < 0:
        ap.error("--workers and --gpu-workers must be >= 0")
    for key in ("images", "width", "height", "distinct", "batch", "image_size", "repeats"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.images < args.batch:
        ap.error(f"--images {args.images} is smaller than one batch ({args.batch})")
    return args


# ---- data --------------------------------------------------------------------------------------------------------
def generate(root: pathlib.Path, args) -> None:
    """ImageNet layout: train/<class>/*.JPEG (``--images`` files), val/<class>/ (one each)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = args.height, args.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blobs = []
    for _ in range(min(args.distinct, args.images)):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.3)]
        base = np.stack(
            [
                np.sin(xx / w * fx * 6.3 + phase),
                np.cos(yy / h * fy * 6.3 - phase),
                np.sin((xx + yy) / (w + h) * (fx + fy) * 3.1),
            ],
            -1,
        )
        arr = np.clip(127 + 100 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / "blob.jpg"
        Image.fromarray(arr).save(path, quality=90)
        blobs.append(path.read_bytes())
    for split, count in (("train", args.images), ("val", CLASSES)):
        for c in range(CLASSES):
            (root / split / f"n{c:08d}").mkdir(parents=True)
        for i in range(count):
            (root / split / f"n{i % CLASSES:08d}" / f"img_{i:06d}.JPEG").write_bytes(blobs[i % len(blobs)])


def loader(root, args, decoder: str, workers: int, device: torch.device, augment: str):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "imagenet.yaml")  # its augment keys: the official recipe
    cfg.root, cfg.decoder, cfg.workers, cfg.image_size = str(root), decoder, workers, args.image_size
    if augment == "crop_flip":
        cfg.augment.update(COLOUR_OFF)
    cfg.train_subset = args.images // args.batch * args.batch  # whole batches only
    return build_data(cfg, global_batch=args.batch, seed=0, device=device).train


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epoch(train, epoch: int, device: torch.device) -> float:
    train.set_epoch(epoch)
    sync(device)
    start = time.perf_counter()
    checksum = torch.zeros((), device=device)
    for x, _ in train:
        checksum += x[:, :, 0, 0].sum()  # the batch is used on the device (no lazy work left undone)
    sync(device)
    assert torch.isfinite(checksum)
    return len(train) * train.global_batch / (time.perf_counter() - start)


def measure_pipeline(root, args, decoder: str, workers: int, device: torch.device, augments, log) -> list[dict]:
    """One row per augmentation; their timed epochs alternate (A B A B ...), so a shared machine's load drifting
    during the run weighs on each alike and their ratio, the colour augmentation's cost, stays fair."""
    trains, warm = {}, {}
    for augment in augments:
        trains[augment] = train = loader(root, args, decoder, workers, device, augment)
        started = time.perf_counter()
        train.set_epoch(0)
        for k, _batch in enumerate(train if args.warmup else ()):
            if k + 1 >= args.warmup:
                break
        sync(device)
        warm[augment] = time.perf_counter() - started
    samples = {a: [] for a in augments}
    for r in range(args.repeats):
        for augment in augments:
            samples[augment].append(timed_epoch(trains[augment], r + 1, device))
            log(f"  {decoder} w={workers} {augment}: epoch {r + 1}/{args.repeats} {samples[augment][-1]:.0f} img/s")
    rows = []
    for augment in augments:
        med = statistics.median(samples[augment])
        rows.append(
            {
                "pipeline": decoder,
                "workers": workers,
                "augment": augment,
                "images_per_epoch": len(trains[augment]) * args.batch,
                "images_per_s": med,
                "samples": samples[augment],
                "spread": (max(samples[augment]) - min(samples[augment])) / med,
                "warmup_s": warm[augment],
            }
        )
    trains.clear()
    return rows


def measure(root, args, device, log) -> list[dict]:
    augments = AUGMENTS if args.augment == "both" else (args.augment,)
    measured = [measure_pipeline(root, args, "pil", w, device, augments, log) for w in args.worker_list]
    measured.append(measure_pipeline(root, args, "gpu", args.gpu_workers, device, augments, log))
    rows = [r for augment in augments for pipeline in measured for r in pipeline if r["augment"] == augment]
    for augment in augments:
        best = max((r["images_per_s"] for r in rows if r["pipeline"] == "pil" and r["augment"] == augment), default=0)
        for r in rows:
            if r["augment"] == augment:
                r["vs_best_pil"] = r["images_per_s"] / best if best else None
    base = {(r["pipeline"], r["workers"]): r["images_per_s"] for r in rows if r["augment"] == "crop_flip"}
    for r in rows:  # the colour augmentation's cost: the same pipeline's images/s without it
        plain = base.get((r["pipeline"], r["workers"]))
        r["vs_crop_flip"] = r["images_per_s"] / plain if plain and r["augment"] != "crop_flip" else None
    return rows


# ---- report ------------------------------------------------------------------------------------------------------
def render(args, device, rows, source: str) -> tuple[str, str]:
    header = (
        f"bench_data | device: {device_name(device)} | torch {torch.__version__} | torchvision "
        f"{torchvision.__version__}"
    )
    lines = [
        f"{source}; batch {args.batch}, RandomResizedCrop {args.image_size} + flip (crop_flip; official: + colour "
        f"jitter 0.4/0.4/0.4 + PCA lighting 0.1) + normalize, ready on {device.type}; median of {args.repeats} "
        f"epochs of {rows[0]['images_per_epoch']} images (after {args.warmup} warm-up batches)",
        "",
        "| pipeline | workers | augment | img/s | vs best pil | vs crop_flip | spread |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = "pil (PIL in workers)" if r["pipeline"] == "pil" else f"gpu (decode_jpeg on {device.type})"
        vs = "-" if r["vs_best_pil"] is None else f"{r['vs_best_pil']:.2f}"
        cost = "-" if r["vs_crop_flip"] is None else f"{r['vs_crop_flip']:.2f}"
        lines.append(
            f"| {label} | {r['workers']} | {r['augment']} | {r['images_per_s']:.0f} | {vs} | {cost} | "
            f"{r['spread']:.0%} |"
        )
    return header, "\n".join(lines)


def write_outputs(args, device, header, table, rows) -> list[pathlib.Path]:
    payload = {
        "torchvision": torchvision.__version__,
        "args": dict(vars(args)),
        "results": rows,
        "table_markdown": table,
    }
    stem = f"bench_data-{device.type}"
    return write_bench_outputs("bench_data.py", args.out, stem, device, f"{header}\n\n{table}", payload)


def main(argv=None) -> int:
    import warnings

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
    device = torch.device(args.device)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        if args.root:
            root, source = pathlib.Path(args.root), f"ImageNet at {args.root}"
        else:
            root = pathlib.Path(tmp)
            started = time.perf_counter()
            generate(root, args)
            source = (
                f"{args.images} generated {args.width}x{args.height} JPEGs ({min(args.distinct, args.images)} "
                "distinct, page-cached)"
            )
            log(f"generated {args.images} JPEGs in {time.perf_counter() - started:.1f} s")
        rows = measure(root, args, device, log)
    header, table = render(args, device, rows, source)
    print(header)
    print()
    print(table)
    if args.out:
        for path in write_outputs(args, device, header, table, rows):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
