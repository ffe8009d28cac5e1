"""Runs per hour of one small grid trained with 1 worker and with N (`sweep.workers`), measured in one run.

    python scripts/bench_sweep.py                          # GN Table 2 at preset=local, 32 and 2 images/GPU
    python scripts/bench_sweep.py --workers 1,2,4 --grid per_gpu_batch=32,16,8,4,2
    python scripts/bench_sweep.py --out results/benchmarks/  # also writes cpu_bench_sweep.{md,json}

Each measurement is a real `normbench sweep` into a fresh temporary results_dir (nothing is skipped), timed by
wall clock; the ratio to one worker is what to read (these machines are shared and noisy). On a GPU every worker
takes GPU ``i mod (visible GPUs)``; on the CPU each takes cores / workers threads.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from scripts._bench_common import write_bench_outputs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="gn_table2")
    p.add_argument("--preset", default="local", help="none: the experiment's own recipe, with --extra on top")
    p.add_argument("--grid", default="per_gpu_batch=32,2", help="overrides that slice the grid (space-separated)")
    p.add_argument("--workers", default="1,2", help="comma list; the first is the baseline")
    p.add_argument("--extra", default="logger.progress=false", help="more overrides for every run")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json (a folder: cpu_/gpu_bench_sweep)")
    return p.parse_args(argv)


def timed_sweep(args, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as results:
        command = [
            sys.executable,
            "-m",
            "normbench",
            "sweep",
            f"experiment={args.experiment}",
            *([f"preset={args.preset}"] if args.preset != "none" else []),
            *args.grid.split(),
            *args.extra.split(),
            f"sweep.workers={workers}",
            f"results_dir={results}",
        ]
        env = {**os.environ, "WANDB_MODE": "disabled"}
        env.pop("OMP_NUM_THREADS", None)  # each worker gets its share (normbench.sweep_workers); one worker: all
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"bench_sweep: the sweep with {workers} workers failed:\n{proc.stderr[-2000:]}")
        runs = len(list(pathlib.Path(results).rglob("result.json")))
    return seconds, runs


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    for workers in counts:
        seconds, runs = timed_sweep(args, workers)
        rows.append(
            {"workers": workers, "runs": runs, "seconds": round(seconds, 1), "runs_per_hour": 3600 * runs / seconds}
        )
        print(f"  {workers} worker(s): {runs} runs in {seconds:.1f}s", flush=True)
    base = rows[0]["seconds"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"bench_sweep: `normbench sweep experiment={args.experiment} preset={args.preset} {args.grid}`, "
        f"{device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{cores} cores'})",
        "",
        "| workers | runs | wall s | runs/hour | time vs 1st |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        row["time_vs_first"] = row["seconds"] / base
        lines.append(
            f"| {row['workers']} | {row['runs']} | {row['seconds']:.1f} | {row['runs_per_hour']:.0f} | "
            f"{row['time_vs_first']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        stem = f"{device.type}_bench_sweep"
        write_bench_outputs("bench_sweep.py", args.out, stem, device, text, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
