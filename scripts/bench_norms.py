#!/usr/bin/env python
"""Speed of every normbench norm layer relative to BatchNorm, forward + backward, same run, same shape.

Prints ONE table: per row and shape, the median over rounds of (fwd+bwd time of the layer / fwd+bwd time of its
baseline in the same round), and the layer's median time (the baselines' absolute medians in the header rows).
Every round times every row once, in a fresh shuffled order, so a ratio compares two timings taken moments apart:
the noise of a shared machine (other tenants, page faults of fresh 100 MB tensors) hits both alike.

Rows with a target: ``gn`` vs calling ``F.group_norm`` directly (<= 1.1), ``bn`` with 8 emulated GPUs vs plain
BN (<= 1.2; the default and both per-GPU implementations are timed), ``sn``, ``pono`` and ``evonorm_b0/s0``
vs BN (<= 2).

    python scripts/bench_norms.py                 # ResNet-50 shapes 32x256x56x56, 32x1024x14x14; cpu (+cuda)
    python scripts/bench_norms.py --small         # 32x64x56x56, 32x256x14x14: a couple of minutes on 2 cores
    python scripts/bench_norms.py --shapes 8x64x32x32 --device cuda --repeats 30 --channels-last
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from normbench.norms import batch_norm as bn_mod  # noqa: E402
from normbench.norms import build_norm  # noqa: E402
from normbench.norms.evonorm import kernels_switched_off  # noqa: E402

FULL_SHAPES = ["32x256x56x56", "32x1024x14x14"]
SMALL_SHAPES = ["32x64x56x56", "32x256x14x14"]
CHUNKS = 8  # per-GPU rows: the batch is 8 emulated GPUs


def parse_shape(s: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in s.lower().split("x"))
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"shape {s!r} must be NxCxHxW")
    return shape


def rows_for(N: int, C: int):
    """(label, factory -> callable(x) -> y, baseline label, target ratio or None)."""
    n = N // CHUNKS if N % CHUNKS == 0 and N >= 2 * CHUNKS else None
    gn_groups = 32 if C % 32 == 0 else 1

    def layer(name, **opts):
        return lambda: build_norm(name, C, **opts)

    def per_gpu_bn(impl):
        def make():
            m = build_norm("bn", C, per_gpu_batch=n)

            def fwd(x):
                old = bn_mod.PER_GPU_IMPL
                bn_mod.PER_GPU_IMPL = impl
                try:
                    return m(x)
                finally:
                    bn_mod.PER_GPU_IMPL = old

            fwd.module = m
            return fwd

        return make

    def direct_group_norm():
        w = nn.Parameter(torch.ones(C))
        b = nn.Parameter(torch.zeros(C))
        f = lambda x: F.group_norm(x, gn_groups, w, b, 1e-5)  # noqa: E731
        f.params = (w, b)
        return f

    rows = [
        ("BN (nn.BatchNorm2d)", lambda: nn.BatchNorm2d(C), None, None),
        ("F.group_norm direct", direct_group_norm, None, None),
        ("bn", layer("bn"), "BN (nn.BatchNorm2d)", None),
        ("syncbn (1 process)", layer("syncbn"), "BN (nn.BatchNorm2d)", None),
    ]
    if n is not None:
        rows += [
            (
                f"bn per_gpu_batch={n} ({CHUNKS} GPUs, default impl)",
                layer("bn", per_gpu_batch=n),
                "BN (nn.BatchNorm2d)",
                1.2,
            ),
            (f"bn per_gpu_batch={n} impl=view (NCHW default)", per_gpu_bn("view"), "BN (nn.BatchNorm2d)", None),
            (f"bn per_gpu_batch={n} impl=fused (channels_last)", per_gpu_bn("fused"), "BN (nn.BatchNorm2d)", None),
        ]
    rows += [
        (f"gn groups={gn_groups}", layer("gn", groups=gn_groups), "F.group_norm direct", 1.1),
        (f"gn groups={gn_groups} vs BN", layer("gn", groups=gn_groups), "BN (nn.BatchNorm2d)", None),
        ("ln", layer("ln"), "BN (nn.BatchNorm2d)", None),
        ("in", layer("in"), "BN (nn.BatchNorm2d)", None),
        ("sn", layer("sn"), "BN (nn.BatchNorm2d)", 2.0),
    ]
    if n is not None:
        rows += [(f"sn per_gpu_batch={n}", layer("sn", per_gpu_batch=n), "BN (nn.BatchNorm2d)", 2.0)]
    rows += [
        ("sn use_bn=false", layer("sn", use_bn=False), "BN (nn.BatchNorm2d)", None),
        ("pono", layer("pono"), "BN (nn.BatchNorm2d)", 2.0),
        ("brn" + (f" per_gpu_batch={n}" if n else ""), layer("brn", per_gpu_batch=n), "BN (nn.BatchNorm2d)", None),
        ("frn", layer("frn"), "BN (nn.BatchNorm2d)", None),
        (
            "evonorm_b0" + (f" per_gpu_batch={n}" if n else ""),
            layer("evonorm_b0", per_gpu_batch=n),
            "BN (nn.BatchNorm2d)",
            2.0,
        ),
        (f"evonorm_s0 groups={gn_groups}", layer("evonorm_s0", groups=gn_groups), "BN (nn.BatchNorm2d)", 2.0),
    ]
    return rows


def measure(shape, device, repeats, channels_last, log):
    N, C, H, W = shape
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_()
    gy = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = rows_for(N, C)
    fns = {}
    for label, make, _, _ in rows:
        if label in fns:
            continue
        f = make()
        if isinstance(f, nn.Module):
            f = f.to(device).train()
        elif hasattr(f, "module"):
            f.module.to(device).train()
        elif hasattr(f, "params"):
            for p in f.params:
                p.data = p.data.to(device)
        fns[label] = f
    labels = list(fns)

    def step(f):
        x.grad = None
        sync()
        t0 = time.perf_counter()
        f(x).backward(gy)
        sync()
        return time.perf_counter() - t0

    for label in labels:  # warm-up (allocator, kernels, lazy init)
        step(fns[label])
        step(fns[label])
    times = {label: [] for label in labels}
    for r in range(repeats):
        # a fresh (seeded) order each round: a row's timing depends on what ran just before it (the heap it left
        # behind decides which fresh tensors page-fault), so no row may always follow the same one
        for label in random.Random(r).sample(labels, len(labels)):
            times[label].append(step(fns[label]))
        log(f"  {device.type} {'x'.join(map(str, shape))}: round {r + 1}/{repeats}")
    return rows, times


def numba_version() -> str:
    """numba and its threading layer (EvoNorm's CPU kernels run on it), or why the kernels are off."""
    try:
        import numba
    except ImportError:
        return "numba missing (EvoNorm in tensor ops)"
    if kernels_switched_off():
        return f"numba {numba.__version__} off (NORMBENCH_CPU_KERNELS=0)"
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run: one thread runs the kernels' serial build
        layer = "serial" if torch.get_num_threads() == 1 else "no kernel ran"
    return f"numba {numba.__version__} ({layer})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help=f"use {', '.join(SMALL_SHAPES)}")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, help="NxCxHxW shapes (override --small)")
    ap.add_argument(
        "--device", choices=["all", "cpu", "cuda"], default="all", help="all = cpu, plus cuda when available (default)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15 cpu, 30 cuda)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for cpu")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or [parse_shape(s) for s in (SMALL_SHAPES if args.small else FULL_SHAPES)]
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            ap.error("--device cuda but CUDA is not available")
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    columns = []  # (header, rows, median time per label, ratio per (label, baseline))
    for device in devices:
        repeats = args.repeats or (30 if device.type == "cuda" else 15)
        for shape in shapes:
            rows, times = measure(shape, device, repeats, args.channels_last, log)
            med = {label: statistics.median(ts) for label, ts in times.items()}
            ratio = {
                (label, base): statistics.median(a / b for a, b in zip(times[label], times[base]))
                for label, _, base, _ in rows
                if base is not None
            }
            columns.append((f"{device.type} {'x'.join(map(str, shape))}", rows, med, ratio))

    # one table: rows = union of row labels in order of first appearance
    order, meta = [], {}
    for _, rows, _, _ in columns:
        for label, _, base, target in rows:
            key = (label, base)
            if key not in meta:
                order.append(key)
                meta[key] = target
    col_w = max(24, *(len(h) + 2 for h, _, _, _ in columns))
    name_w = max(len(lbl) + (len(base) + 6 if base else 0) for lbl, base in order) + 2
    print(
        f"normbench norm layers: forward+backward time / baseline time (median over interleaved rounds); "
        f"torch {torch.__version__}, cpu threads {torch.get_num_threads()}, {numba_version()}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}"
    )
    header = f"{'layer (vs baseline)':<{name_w}}" + "".join(f"{h:>{col_w}}" for h, _, _, _ in columns) + "  target"
    print(header)
    print("-" * len(header))
    for label, base in order:
        name = label if base is None else f"{label} (vs {base.split(' (')[0]})"
        cells = []
        for _, _rows, med, ratio in columns:
            if label not in med:
                cells.append(f"{'-':>{col_w}}")
            elif base is None:
                cells.append(f"{med[label] * 1e3:>{col_w - 3}.2f} ms")
            else:
                cells.append(f"{ratio[(label, base)]:>{col_w - 10}.2f}x {med[label] * 1e3:6.1f}ms")
        target = meta[(label, base)]
        status = ""
        if target is not None:
            ok = all(ratio[(label, base)] <= target for _, _, med, ratio in columns if label in med)
            status = f"<= {target}  {'ok' if ok else 'MISSED'}"
        print(f"{name:<{name_w}}" + "".join(cells) + "  " + status)


if __name__ == "__main__":
    main()
