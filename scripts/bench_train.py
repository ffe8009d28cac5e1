#!/usr/bin/env python
"""Training throughput (images/s) of a full step -- forward, backward, SGD step -- per norm layer and per-GPU batch.

One step processes ``gpus x per_gpu_batch`` synthetic images (already on the device: no data loading). Norm layers
that take ``per_gpu_batch`` (bn, sn, brn, evonorm_b0) get it, so batch statistics are those of one emulated GPU,
as in ``normbench train``. Every (norm, per-GPU batch) pair is built once (its own model and SGD optimizer),
warmed up, then timed ``--repeats`` times; the repeats are interleaved round-robin over all pairs (rotating the
order every round) so machine noise hits every pair alike, and the median is reported. BN is always measured:
every row carries its ratio to BN at the same batch in the same run, and a "per image" column compares the
throughput at each small per-GPU batch with the same norm's at the reference batch (32, else the largest).
Issue target: at 8x2 images per step, bn and gn keep >= 0.5x their own 8x32 throughput.

``--mode`` picks how the step runs: ``eager``, ``compiled`` (torch.compile of the step's forward and loss, as
``normbench train fast.compile=true`` does: ``normbench.fast.make_steps``) or ``cuda_graphs`` (the same, captured
with CUDA graphs: ``fast.cuda_graphs=true``). Three baseline rows at the reference batch come with every run
(``--no-baselines`` drops them), in the same mode and the same interleaved rounds:
  plain_bn@G*R    the same model with ``nn.BatchNorm2d`` over the whole step's G*R images (for resnet50:
                  torchvision's resnet50 as everyone runs it, batch 256): what per-GPU BN is measured against
  hand_loop bn    a minimal hand-written loop (forward, loss, zero_grad, backward, SGD step) on the per-GPU BN model
  trainer bn      normbench's own ``train_one_epoch`` on the same model, data and optimizer: ``trainer / hand_loop``
                  is the trainer's overhead (target >= 0.95x)
``--json FILE`` merges this run's figures into FILE in the layout of results/benchmarks/gpu.json (one section per
model: images/s for resnet50, epoch seconds of 50,000 images for cifar_resnet20).

    python scripts/bench_train.py                          # CPU: cifar_resnet8 28x28, bn,gn,sn at 8x32 and 8x2
    python scripts/bench_train.py --ci                     # seconds: a width-4 ResNet-8 on 8x8 images
    python scripts/bench_train.py --device cuda            # GPU: resnet50 224x224, bf16, channels_last
    python scripts/bench_train.py --model resnet50 --norms bn,gn,sn,gn:groups=16 --per-gpu-batch 32,8,2 \\
        --amp bf16 --channels-last --mode compiled --out results/benchmarks/h100_resnet50
    python scripts/bench_train.py --device cuda --mode cuda_graphs --json results/benchmarks/gpu.json

A norm is ``name`` or ``name:key=value:key=value`` (options of normbench.norms.norm_options(name)); ``groups``
defaults to the model config's ``norm_groups`` as in configs/norm/gn.yaml. ``--out PATH`` writes PATH.md and
PATH.json (a directory: bench_train-<model>-<device>.{md,json} inside) with device, torch version, arguments,
git commit and every timing sample.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from contextlib import nullcontext

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from normbench.models import build_model  # noqa: E402
from normbench.norms import NormConfigError, norm_layer  # noqa: E402
from normbench.paths import CONFIG_DIR  # noqa: E402
from scripts._bench_common import device_name, write_bench_outputs  # noqa: E402

BASELINE = "bn"
REFERENCE_BATCH = 32  # the papers' per-GPU batch: the "per image" column is relative to it
PER_IMAGE_TARGET = {"bn": 0.5, "gn": 0.5}  # issue target at the smallest per-GPU batch

# Defaults by device; command-line values override them.
DEFAULTS = {
    # one thread: on a small shared CPU, OpenMP's second thread made steps up to 10x SLOWER and noisier
    "cpu": dict(
        model="cifar_resnet8",
        image_size=28,
        norms="bn,gn,sn",
        per_gpu_batch="32,2",
        gpus=8,
        amp="none",
        channels_last=False,
        repeats=7,
        steps=3,
        warmup=2,
        threads=1,
    ),
    "cuda": dict(
        model="resnet50",
        image_size=224,
        norms="bn,gn,sn",
        per_gpu_batch="32,2",
        gpus=8,
        amp="bf16",
        channels_last=True,
        repeats=7,
        steps=10,
        warmup=5,
    ),
    # --ci: a few seconds on 2 CPU cores, exercises every code path
    "ci": dict(
        model="cifar_resnet8",
        image_size=8,
        norms="bn,gn,sn",
        per_gpu_batch="4,2",
        gpus=2,
        amp="none",
        channels_last=False,
        repeats=3,
        steps=2,
        warmup=1,
        width=4,
        norm_groups=2,
        threads=1,
    ),
}
IMAGENET_MODELS = ("resnet50", "resnet18", "timm")
MODES = ("eager", "compiled", "cuda_graphs")
CIFAR_EPOCH = 50_000  # images in a CIFAR-10 training epoch: cifar_resnet20's gpu.json figure is seconds per epoch


# ---- arguments ---------------------------------------------------------------------------------------------------
def parse_norm(spec: str) -> tuple[str, str, dict]:
    """'gn:groups=16' -> (label, name, options)."""
    name, *pairs = spec.strip().split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"norm option {pair!r} in {spec!r} must be key=value")
        options[key] = yaml.safe_load(value)
    return spec.strip(), name, options


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        help="configs/model/NAME.yaml: resnet50, resnet18, cifar_resnet20, cifar_resnet8, "
        "timm, ... (default: cifar_resnet8 on cpu, resnet50 on cuda)",
    )
    ap.add_argument("--timm-name", help="model.timm_name for --model timm")
    ap.add_argument("--width", type=int, help="model.width override (cifar_resnet models)")
    ap.add_argument(
        "--norm-groups",
        type=int,
        help="model.norm_groups override: the default groups of gn / "
        "evonorm_s0 (the model config's: 32 ImageNet, 8 CIFAR)",
    )
    ap.add_argument(
        "--norms",
        help="comma-separated norms, each name[:key=value...] (default bn,gn,sn); "
        "bn is added as the baseline when missing",
    )
    ap.add_argument("--per-gpu-batch", help="comma-separated per-GPU batch sizes (default 32,2)")
    ap.add_argument("--gpus", type=int, help="emulated GPUs: one step = gpus x per_gpu_batch images (default 8)")
    ap.add_argument("--image-size", type=int, help="default 28 on cpu, 224 on cuda")
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--num-classes", type=int, help="default 1000 for ImageNet models, 10 otherwise")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--amp", choices=["none", "bf16"], help="autocast dtype (default none on cpu, bf16 on cuda)")
    ap.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last model and input (default on for cuda, off on cpu: torch 2.14's cpu "
        "channels_last conv backward corrupts the heap on 4-channel layers)",
    )
    ap.add_argument(
        "--mode",
        choices=MODES,
        default="eager",
        help="eager | compiled (the trainer's compiled step) | cuda_graphs (compiled + CUDA graphs); warm-up compiles",
    )
    ap.add_argument("--compile", action="store_true", help="the same as --mode compiled")
    ap.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the plain_bn, hand_loop and trainer rows at the reference batch (default on)",
    )
    ap.add_argument("--json", help="merge the figures into this gpu.json-style file")
    ap.add_argument("--repeats", type=int, help="timed rounds per (norm, batch); the median is reported")
    ap.add_argument("--steps", type=int, help="training steps per timed round")
    ap.add_argument("--warmup", type=int, help="untimed steps per (norm, batch) before timing")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads on cpu (default 1: on a small shared "
        "machine more threads were slower and far noisier)",
    )
    ap.add_argument("--out", help="write OUT.md and OUT.json (or into a directory: bench_train-<model>-<device>.*)")
    ap.add_argument("--ci", action="store_true", help="tiny sizes: a few seconds, for tests")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)

    if args.compile:  # the older spelling of --mode compiled
        args.mode = "compiled"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mode == "cuda_graphs" and args.device != "cuda":
        ap.error("--mode cuda_graphs needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available; use --device cpu")
    preset = DEFAULTS["ci" if args.ci else args.device]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.num_classes is None:
        args.num_classes = 1000 if args.model in IMAGENET_MODELS else 10
    try:
        args.norm_specs = [parse_norm(s) for s in args.norms.split(",") if s.strip()]
        args.batches = [int(b) for b in str(args.per_gpu_batch).split(",") if b.strip()]
    except (argparse.ArgumentTypeError, ValueError) as err:
        ap.error(str(err))
    if not any(name == BASELINE and not opts for _, name, opts in args.norm_specs):
        args.norm_specs.insert(0, (BASELINE, BASELINE, {}))
    if not args.batches or min(args.batches) < 1:
        ap.error("--per-gpu-batch needs positive integers, e.g. 32,2")
    for key in ("gpus", "repeats", "steps", "image_size"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.channels_last and args.device == "cpu":
        print(
            "warning: --channels-last on cpu: torch 2.14's channels_last conv backward corrupts the heap on "
            "4-channel layers",
            file=sys.stderr,
        )
    return args


# ---- measurement -------------------------------------------------------------------------------------------------
def model_config(args):
    path = CONFIG_DIR / "model" / f"{args.model}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise SystemExit(f"bench_train: no configs/model/{args.model}.yaml; choose one of {', '.join(names)}")
    cfg = OmegaConf.load(path)
    if args.timm_name:
        cfg.timm_name = args.timm_name
    if args.width is not None:
        cfg.width = args.width
    if args.norm_groups is not None:
        cfg.norm_groups = args.norm_groups
    if "timm_name" in cfg and cfg.name == "timm" and cfg.timm_name:
        cfg.id = f"timm-{cfg.timm_name}"  # resolve the interpolation without the full train config
    return cfg


def layer_options(name: str, options: dict, per_gpu_batch: int, model_cfg) -> dict:
    """What `normbench train norm=NAME` passes to the layer: configs/norm/NAME.yaml (groups = the model's
    norm_groups) with ``options`` on top, through normbench.norms.NormSpec (per_gpu_batch where accepted)."""
    from normbench.norms import NormSpec

    norm = OmegaConf.load(CONFIG_DIR / "norm" / f"{name}.yaml")
    if "channels_per_group" in options and "groups" not in options and "groups" in norm:
        norm.groups = None  # one of the two: the command line's channels_per_group replaces the default groups
    norm = OmegaConf.merge(norm, options)
    config = OmegaConf.to_container(OmegaConf.create({"model": model_cfg, "norm": norm}), resolve=True)
    return NormSpec.from_config({**config, "per_gpu_batch": per_gpu_batch}).options


class Runner:
    """One row at one per-GPU batch: its model, optimizer and synthetic batch; ``run(n)`` times n steps.

    ``kind``: ``norm`` (the trainer's step function for the norm, in ``args.mode``), ``plain_bn`` (nn.BatchNorm2d,
    the same step function), ``hand_loop`` (the minimal loop, the model compiled as in ``args.mode``) or
    ``trainer`` (normbench.loop.train_one_epoch over the same batch)."""

    def __init__(self, args, cfg, label, name, options, per_gpu_batch, device, kind="norm"):
        from normbench.fast import make_steps

        self.label, self.per_gpu_batch, self.kind = label, per_gpu_batch, kind
        self.images_per_step = args.gpus * per_gpu_batch
        self.options = {} if kind == "plain_bn" else layer_options(name, options, per_gpu_batch, cfg)
        self.device, self.args = device, args
        self.samples: list[float] = []
        self.loss = float("nan")
        torch.manual_seed(0)
        layer = torch.nn.BatchNorm2d if kind == "plain_bn" else norm_layer(name, **self.options)
        model = build_model(cfg, layer, args.num_classes, args.in_channels)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=fmt).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(1)
        shape = (self.images_per_step, args.in_channels, args.image_size, args.image_size)
        self.images = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
        self.labels = torch.randint(0, args.num_classes, (self.images_per_step,), generator=gen).to(device)
        amp = {"bf16": torch.bfloat16}.get(args.amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
        fast = {"compile": args.mode != "eager", "cuda_graphs": args.mode == "cuda_graphs"}
        self.cuda_graphs = fast["cuda_graphs"]
        self.forward_loss, _ = make_steps(self.model, self.model, fast, self.autocast)
        if kind == "hand_loop":
            mode = "reduce-overhead" if self.cuda_graphs else None
            self.forward = torch.compile(self.model, dynamic=False, mode=mode) if fast["compile"] else self.model
        if kind == "trainer":
            self._trainer_setup(fast)

    def _trainer_setup(self, fast) -> None:
        from normbench import distributed
        from normbench.loop import Loop

        self.loop = Loop(
            device=self.device,
            dist=distributed.Dist(),
            raw_model=self.model,
            channels_last=self.args.channels_last,
            sync_buffers_every_step=False,
            show_progress=False,
            amp_dtype={"bf16": torch.bfloat16}.get(self.args.amp),
            scaler=torch.amp.GradScaler(self.device.type, enabled=False),
            images_per_step=self.images_per_step,
            epochs=1,
            check_every=50,
            forward_loss=self.forward_loss,
            eval_forward=None,
            cuda_graphs=fast["cuda_graphs"],  # compile_pending stays False: warm-up steps compile, untimed
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def step(self) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.kind == "hand_loop":  # nothing but the five calls every PyTorch tutorial writes
            with self.autocast():
                loss = F.cross_entropy(self.forward(self.images), self.labels)
        else:
            loss = self.forward_loss(self.images, self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().clone() if self.cuda_graphs else loss

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps, the device synchronized before and after."""
        self.sync()
        start = time.perf_counter()
        if self.kind == "trainer":
            from normbench.loop import train_one_epoch

            loader = _RepeatedBatch(self.images, self.labels, steps)
            row = train_one_epoch(self.model, loader, self.optimizer, self.scheduler, 0, self.loop)
            self.sync()
            self.loss = row["train_loss"]
            return time.perf_counter() - start
        for _ in range(steps):
            loss = self.step()
        self.sync()
        seconds = time.perf_counter() - start
        self.loss = loss.detach().float().item()
        return seconds

    def release(self) -> None:
        """Free the model, optimizer state and batch (between rounds they would only take memory)."""
        self.model = self.forward = self.forward_loss = self.optimizer = self.images = self.labels = None
        self.loop = None


class _RepeatedBatch:
    """A loader of ``steps`` copies of one batch, with the interface train_one_epoch reads."""

    def __init__(self, images, labels, steps):
        self.images, self.labels, self.steps = images, labels, steps

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        return ((self.images, self.labels) for _ in range(self.steps))


def measure(args, device, log) -> dict:
    cfg = model_config(args)
    pairs = [(label, name, opts, b, "norm") for label, name, opts in args.norm_specs for b in args.batches]
    reference = REFERENCE_BATCH if REFERENCE_BATCH in args.batches else max(args.batches)
    if args.baselines:
        pairs += [(label, BASELINE, {}, reference, kind) for label, kind in baseline_rows(args, reference)]
    runners, failed = [], {}
    for label, name, opts, b, kind in pairs:
        try:
            runner = Runner(args, cfg, label, name, opts, b, device, kind)
            runner.run(args.warmup) if args.warmup else None
            runners.append(runner)
            log(f"  built + warmed up {label} at {args.gpus}x{b}")
        except (NormConfigError, ValueError) as err:  # e.g. sn with use_bn at 1 image per GPU
            failed[(label, b)] = f"config: {err}"
            log(f"  {label} at {args.gpus}x{b}: {err}")
        except torch.cuda.OutOfMemoryError:
            failed[(label, b)] = "OOM"
            log(f"  {label} at {args.gpus}x{b}: out of memory")
            torch.cuda.empty_cache()
    for r in range(args.repeats):
        k = r % max(1, len(runners))
        for runner in runners[k:] + runners[:k]:  # rotate the order every round
            seconds = runner.run(args.steps)
            runner.samples.append(args.steps * runner.images_per_step / seconds)
        log(f"  round {r + 1}/{args.repeats}")
    results = []
    for runner in runners:
        med = statistics.median(runner.samples)
        results.append(
            {
                "norm": runner.label,
                "per_gpu_batch": runner.per_gpu_batch,
                "images_per_step": runner.images_per_step,
                "layer_options": runner.options,
                "images_per_s": med,
                "samples": runner.samples,
                "spread": (max(runner.samples) - min(runner.samples)) / med,
                "final_loss": runner.loss,
            }
        )
        runner.release()
    for (label, b), why in failed.items():
        results.append(
            {"norm": label, "per_gpu_batch": b, "images_per_step": args.gpus * b, "images_per_s": None, "error": why}
        )
    by_key = {(r["norm"], r["per_gpu_batch"]): r for r in results}
    for r in results:
        base = by_key.get((BASELINE, r["per_gpu_batch"]), {}).get("images_per_s")
        ref = by_key.get((r["norm"], reference), {}).get("images_per_s")
        ips = r["images_per_s"]
        r["vs_bn"] = ips / base if ips and base else None
        r["per_image_vs_reference"] = ips / ref if ips and ref else None
    return {"results": results, "reference_batch": reference}


def baseline_rows(args, reference: int) -> list[tuple[str, str]]:
    """(label, kind) of the baseline rows, all at the reference per-GPU batch."""
    return [
        (f"plain_bn@{args.gpus * reference}", "plain_bn"),
        ("hand_loop bn", "hand_loop"),
        ("trainer bn", "trainer"),
    ]


# ---- report ------------------------------------------------------------------------------------------------------
def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(args, device, measured: dict) -> tuple[str, str, list[str]]:
    """(header line, Markdown table, target lines)."""
    dtype = "bf16 autocast" if args.amp == "bf16" else "float32"
    header = (
        f"bench_train | device: {device_name(device)} | torch {torch.__version__} | dtype {dtype} | "
        f"channels_last {'on' if args.channels_last else 'off'} | mode {args.mode}"
    )
    model = args.model + (f" ({args.timm_name})" if args.timm_name else "")
    ref = measured["reference_batch"]
    g = args.gpus
    cols = ["norm"]
    for b in args.batches:
        cols += [f"{g}x{b} img/s", "vs BN"] + ([f"per image vs {g}x{ref}"] if b != ref else [])
    lines = [
        f"{model}, {args.image_size}x{args.image_size}x{args.in_channels} synthetic images, {g} emulated GPUs; "
        f"train step = fwd + bwd + SGD; median of {args.repeats} interleaved rounds x {args.steps} steps "
        f"(warm-up {args.warmup} steps excluded)",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|",
    ]
    by_key = {(r["norm"], r["per_gpu_batch"]): r for r in measured["results"]}
    labels = [label for label, _, _ in args.norm_specs]
    if args.baselines:
        labels += [label for label, _ in baseline_rows(args, ref)]
    for label in labels:
        cells = [label]
        for b in args.batches:
            r = by_key.get((label, b), {})
            ips = r.get("images_per_s")
            cells += [
                fmt(ips, ".0f") if ips is not None else r.get("error", "-").split(":")[0],
                fmt(r.get("vs_bn"), ".2f"),
            ]
            if b != ref:
                cells.append(fmt(r.get("per_image_vs_reference"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{r['norm']} at {g}x{r['per_gpu_batch']}: {r['error']}" for r in measured["results"] if r.get("error")]
    if errors:
        lines += [""] + errors
    spreads = [r["spread"] for r in measured["results"] if r.get("spread") is not None]
    if spreads:
        lines += [
            "",
            f"(max - min) / median over rounds: median {statistics.median(spreads):.0%}, worst {max(spreads):.0%}",
        ]
    targets = []
    small = min(args.batches)
    if small != ref:
        for name, threshold in PER_IMAGE_TARGET.items():
            value = by_key.get((name, small), {}).get("per_image_vs_reference")
            if value is not None:
                targets.append(
                    f"target: {name} at {g}x{small} >= {threshold}x its {g}x{ref} images/s: "
                    f"{value:.3f}x {'ok' if value >= threshold else 'MISSED'}"
                )
    if args.baselines:
        ips = lambda label: by_key.get((label, ref), {}).get("images_per_s")  # noqa: E731
        trainer, hand, bn = ips("trainer bn"), ips("hand_loop bn"), ips(BASELINE)
        plain = ips(f"plain_bn@{g * ref}")
        if trainer and hand:
            targets.append(
                f"target: trainer bn >= 0.95x hand_loop bn at {g}x{ref}: {trainer / hand:.3f}x "
                f"{'ok' if trainer / hand >= 0.95 else 'MISSED'}"
            )
        if bn and plain:
            targets.append(f"per-GPU bn at {g}x{ref} / plain_bn@{g * ref}: {bn / plain:.3f}x (GPU target >= 0.9)")
    return header, "\n".join(lines), targets


def write_outputs(args, device, header, table, targets, measured) -> list[pathlib.Path]:
    markdown = f"{header}\n\n{table}" + ("\n\n" + "\n".join(targets) if targets else "")
    payload = {
        "dtype": "bfloat16" if args.amp == "bf16" else "float32",
        "args": {k: v for k, v in vars(args).items() if k not in ("norm_specs",)},
        "reference_batch": measured["reference_batch"],
        "results": measured["results"],
        "targets": targets,
        "table_markdown": table,
    }
    stem = f"bench_train-{args.model}-{device.type}"
    return write_bench_outputs("bench_train.py", args.out, stem, device, markdown, payload)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    header = None
    if not args.quiet:
        header, _, _ = render(args, device, {"results": [], "reference_batch": 0})
        log(header)
    measured = measure(args, device, log)
    header, table, targets = render(args, device, measured)
    print(header)
    print()
    print(table)
    for line in targets:
        print(line)
    if args.out:
        for path in write_outputs(args, device, header, table, targets, measured):
            print(f"wrote {path}")
    if args.json:
        print(f"wrote {write_gpu_json(args, device, measured)}")
    return 0


def write_gpu_json(args, device, measured) -> pathlib.Path:
    """Merge this run into ``args.json`` (results/benchmarks/gpu.json's layout): this run's figures replace the
    same keys of the model's section, everything else is kept, so one file gathers a GPU session's runs."""
    import datetime

    from normbench.runs.provenance import git_state

    path = pathlib.Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(
        device=device_name(device),
        date=datetime.date.today().isoformat(),
        commit=git_state().get("commit"),
        torch=torch.__version__,
    )
    figures = {}
    for r in measured["results"]:
        if r.get("images_per_s") is None:
            continue
        key = r["norm"] if r["norm"].startswith("plain_bn@") else f"{r['norm']}@{args.gpus}x{r['per_gpu_batch']}"
        figures[key] = r["images_per_s"]
    # runs of one model in several modes (8x32 compiled, 8x2 with CUDA graphs) add up: each figure keeps its mode
    section = data.get(args.model, {})
    key = "epoch_s" if args.model == "cifar_resnet20" else "img_per_s"
    if args.model == "cifar_resnet20":
        figures = {k: CIFAR_EPOCH / v for k, v in figures.items()}
    section[key] = {**section.get(key, {}), **figures}
    section["modes"] = {**section.get("modes", {}), **dict.fromkeys(figures, args.mode)}
    section["compiled"] = all(m != "eager" for m in section["modes"].values())
    section["cuda_graphs"] = any(m == "cuda_graphs" for m in section["modes"].values())
    data[args.model] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
