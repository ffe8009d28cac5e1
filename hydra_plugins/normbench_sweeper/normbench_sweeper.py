"""Hydra sweeper for paper tables: expands an experiment's `sweep.grid` and `sweep.seeds` into runs, hands
them to whatever launcher is configured (in-process, submitit_local, submitit_slurm), and ends with a summary.

Grid: a list of blocks, each a mapping {override: [values]} expanded as a cartesian product; blocks are
concatenated (so tables whose cells are not a product, like the SN table, list them block by block).
Command-line sweeps (`norm=bn,gn`) multiply the grid; a command-line value of a grid axis selects that slice
(`per_gpu_batch=2` runs only that column). Runs are idempotent (see normbench.train): rerunning the sweep
skips completed runs and resumes interrupted ones.

`sweep.dry_run=true` lists the planned runs (run directory name and state: done / partial / new, or redo for
a done run under force=true) and trains nothing. A sweep on the in-process launcher launches one run at a time
and logs "run k/N" with an overall ETA; submitit launchers get the whole grid at once (one job array).
"""

import itertools
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf, open_dict

log = logging.getLogger("normbench")


@dataclass
class NormbenchSweeperConf:
    _target_: str = "hydra_plugins.normbench_sweeper.normbench_sweeper.NormbenchSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="normbench", node=NormbenchSweeperConf, provider="normbench")


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def expand_grid(grid: list, allowed: dict | None = None) -> list[dict[str, str]]:
    """[{a: [1, 2], b: [x]}, {a: [3]}] -> [{a: 1, b: x}, {a: 2, b: x}, {a: 3}] (values as override strings).
    `allowed` {axis: values} drops cells whose value on that axis is not allowed at this scale."""
    cells = []
    for block in grid:
        keys = list(block)
        for values in itertools.product(*(block[k] for k in keys)):
            cell = {k: _format(v) for k, v in zip(keys, values)}
            if allowed and any(k in allowed and cell[k] not in {_format(a) for a in allowed[k]} for k in cell):
                log.info("sweep: %s does not fit this preset's model (sweep.allowed); not run", cell)
                continue
            cells.append(cell)
    return cells


def plan_jobs(base_jobs: list[list[str]], grid: list, seeds: list, allowed: dict | None) -> list[list[str]]:
    cells = expand_grid(grid, allowed) or [{}]
    jobs, seen = [], set()
    for base in base_jobs:
        fixed = dict(o.split("=", 1) for o in base)
        for cell in cells:
            if any(k in fixed and fixed[k] != v for k, v in cell.items()):
                continue  # the command line selected another slice of this axis
            job = base + [f"{k}={v}" for k, v in cell.items() if k not in fixed]
            for seed in [None] if "seed" in fixed else seeds:
                full = job + ([f"seed={seed}"] if seed is not None else [])
                if tuple(full) not in seen:
                    seen.add(tuple(full))
                    jobs.append(full)
    return jobs


def run_state(directory) -> str:
    """done / partial / new: normbench.runs.run_state, the trainer's own test (it reads, never moves a file)."""
    from normbench import runs

    return runs.run_state(directory)


def finished_since(directories, since: float) -> list[bool]:
    """Per run directory (None: a bad config): is the run done (run_state), with a result.json written at or
    after `since` (a time.time())? That counts the runs any worker on the grid finished since then, and a
    `force=true` rerun of a finished run once its new result lands."""
    finished = []
    for directory in directories:
        try:
            fresh = directory is not None and (directory / "result.json").stat().st_mtime >= since
        except OSError:  # no result yet
            fresh = False
        finished.append(fresh and run_state(directory) == "done")
    return finished


def _run_directory(config: dict):
    """The run's directory as train() names it: the precision `fast.amp: auto` resolves to on this machine's
    device is part of the run's hash (so a dry run on a CPU login node names the CPU runs)."""
    from normbench import runs
    from normbench.fast import fast_settings, resolve_device

    fast = fast_settings(config, resolve_device(config["device"]))
    config["fast"].update(amp=fast["amp"], channels_last=fast["channels_last"])
    return runs.run_dir(config)


def grid_eta(elapsed_s: float, done_since_start: int, not_done: int) -> str:
    """Time left for a grid: its runs not done yet at the rate runs have been finishing since this sweep
    started, by every worker on the grid (two workers halve it); 'unknown' until one has finished."""
    if not_done == 0:
        return _duration(0)
    return _duration(elapsed_s / done_since_start * not_done) if done_since_start > 0 else "unknown"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class NormbenchSweeper(BasicSweeper):
    def _plan_states(self, jobs: list[list[str]]) -> list[tuple[str, str, Any]]:
        """(run directory name, state, run directory or None for a bad config) of every job. Composing each
        job's config is also the check that every run is legal before any trains (what
        BasicSweeper.validate_batch_is_legal does)."""
        from omegaconf.errors import OmegaConfBaseException

        from normbench import runs
        from normbench.config import validate

        planned = []
        for job in jobs:
            cfg = self.hydra_context.config_loader.load_sweep_config(master_config=self.config, sweep_overrides=job)
            with open_dict(cfg):
                del cfg["hydra"]
            try:
                config = OmegaConf.to_container(cfg, resolve=True)
                validate(config)
                directory = _run_directory(config)
            except (OmegaConfBaseException, ValueError) as err:  # a bad value or interpolation, no GPU for cuda:
                planned.append((" ".join(job), f"bad config: {str(err).splitlines()[0]}", None))  # it fails on it
                continue
            state = run_state(directory)
            if state == "done" and cfg.get("force") and not runs.finished_during_this_command(directory):
                state = "redo"  # force=true: the finished run is set aside and trained again
            planned.append((directory.name, state, directory))
        return planned

    def sweep(self, arguments: list[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        base_jobs = self.split_arguments(overrides, None)[0]
        sweep_cfg = OmegaConf.to_container(self.config.sweep, resolve=True)
        jobs = plan_jobs(
            base_jobs, sweep_cfg.get("grid") or [], sweep_cfg.get("seeds") or [0], sweep_cfg.get("allowed")
        )
        experiment = self.config.experiment
        planned = self._plan_states(jobs)
        known = ("done", "redo", "partial", "new")
        states = Counter(state if state in known else "bad config" for _, state, _ in planned)
        order = ["done", "partial", "new"] + [k for k in ("redo", "bad config") if states[k]]
        counts = ", ".join(f"{states[k]} {k}" for k in order)
        if sweep_cfg.get("dry_run"):
            for name, state, _ in planned:
                print(f"  {state:<8} {name}", flush=True)
            print(
                f"sweep {experiment} (dry run): {len(jobs)} runs in {self.config.results_dir}/{experiment}/: "
                f"{counts}; nothing trained",
                flush=True,
            )
            return states
        log.info("sweep %s: %d runs (%s)", experiment, len(jobs), counts)
        outcomes: Counter = Counter()
        failures = []
        # In process: one run per launch, so that progress is told between runs. A submitit launcher gets the
        # whole grid at once (one job array).
        in_process = isinstance(self.launcher, BasicLauncher)
        batch = self.max_batch_size or (1 if in_process else len(jobs))
        sweep_started = time.time()
        pending = [state in ("new", "partial", "redo") for _, state, _ in planned]  # what this grid still trains
        directories = [directory for _, _, directory in planned]

        def tell_progress(finished: int, outcome: str) -> None:
            if finished >= len(jobs):
                return
            # Read from disk, not from the plan: other workers on the same grid finish runs too, and the
            # grid's completion rate (theirs included) is what tells when it will be done.
            fresh = finished_since(directories, sweep_started)
            left = [p and not f for p, f in zip(pending, fresh)]
            to_train = sum(left[finished:]) if not workers_path else sum(left)
            eta = grid_eta(time.time() - sweep_started, sum(p and f for p, f in zip(pending, fresh)), sum(left))
            print(
                f"sweep {experiment}: run {finished}/{len(jobs)} {outcome}; {to_train} of the "
                f"{len(jobs) - finished} left to train, ETA {eta} for the grid",
                flush=True,
            )

        from normbench.sweep_workers import resolve_workers

        workers = resolve_workers(sweep_cfg.get("workers", 1), str(self.config.get("device", "auto")))
        workers_path = in_process and workers > 1
        if workers_path:
            self._train_in_workers(jobs, planned, workers, outcomes, failures, tell_progress)
            batch = len(jobs) + 1  # nothing left for the in-process launcher
        for start in range(0 if batch <= len(jobs) else len(jobs), len(jobs), batch):
            try:
                returns = self.launcher.launch(jobs[start : start + batch], initial_job_idx=start)
            except Exception as err:
                if type(err).__name__ != "UncompletedJobError":  # submitit's: a cluster job left no result
                    raise
                _uncompleted_job_exit(experiment, err)
            for job, ret in zip(jobs[start : start + batch], returns):
                if ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, dict):
                    outcome = ret._return_value.get("outcome", "completed")
                else:
                    outcome = "failed"
                    failures.append(f"  {' '.join(job)}: {ret._return_value}")
                outcomes[outcome] += 1
            if in_process:
                tell_progress(start + len(returns), outcome)
        order = ["completed", "skipped", "resumed", "diverged", "busy", "interrupted", "failed"]
        summary = ", ".join(f"{outcomes[k]} {k}" for k in order)
        print(f"sweep {experiment}: {len(jobs)} runs: {summary}", flush=True)
        if outcomes["busy"]:
            print(
                f"  {outcomes['busy']} run(s) were being trained by another process; rerun the sweep later "
                "to pick up any it did not finish",
                flush=True,
            )
        if failures:
            print(f"failed runs ({len(failures)} of {len(jobs)}):\n" + "\n".join(failures), file=sys.stderr, flush=True)
            sys.exit(min(len(failures), 100))  # the exit status says how many failed (capped below 126)
        return outcomes

    def _train_in_workers(self, jobs, planned, workers, outcomes, failures, tell_progress) -> None:
        """sweep.workers > 1 (normbench.sweep_workers): finished runs are skipped here without a process; every
        other run trains in a worker process of its own, up to `workers` at once."""
        from pathlib import Path

        from normbench import runs
        from normbench.runs.interrupts import Interrupted
        from normbench.sweep_workers import run_in_workers

        done = [i for i, (_, state, _) in enumerate(planned) if state == "done"]
        outcomes["skipped"] += len(done)
        finished = [len(done)]
        log_dir = Path(str(self.config.hydra.sweep.dir)) / "workers"
        log.info(
            "sweep %s: %d workers; each run's output in %s/<grid index>.log", self.config.experiment, workers, log_dir
        )

        def on_finished(run) -> None:
            name, state, directory = planned[run.index]
            result = runs.read_json(directory / "result.json") if directory is not None else None
            if run.returncode == 0 and runs.is_finished(result):
                outcome = "resumed" if state == "partial" and result["status"] == "completed" else result["status"]
            elif run.returncode == 0:
                outcome = "busy"  # another process held the run's lock
            elif run.returncode >= 128:
                outcome = "interrupted"
            else:
                outcome = "failed"
                lines = run.log_path.read_text(errors="replace").strip().splitlines()
                failures.append(
                    f"  {' '.join(jobs[run.index])}: {lines[-1] if lines else 'no output'} ({run.log_path})"
                )
            outcomes[outcome] += 1
            finished[0] += 1
            tell_progress(finished[0], outcome)

        todo = [i for i in range(len(jobs)) if i not in set(done)]
        device = str(self.config.get("device", "auto"))
        try:
            run_in_workers(jobs, todo, workers, log_dir, on_finished, device=device)
        except Interrupted as stop:
            print(
                f"sweep {self.config.experiment}: interrupted by {stop}; the runs in progress recorded how far they "
                "got: rerun the same sweep to resume them",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + stop.signum)


def _uncompleted_job_exit(experiment: str, err: Exception) -> None:
    """A cancelled (or scheduler-killed) cluster job: one line with its id, state and logs, not submitit's
    traceback. Finished runs stay finished; a killed one recorded how far it got, and the next sweep resumes it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    job, _, result_path = (lines[0] if lines else "a job").partition(" with path ")
    state = next((line for line in lines if "state:" in line), "has not produced any output")
    logs = f" (logs: {result_path.rsplit('/', 1)[0]})" if result_path else ""
    print(
        f"sweep {experiment}: {job} {state}: cancelled or killed by the scheduler; the finished runs are kept, "
        f"rerun the same sweep to resume the rest{logs}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)
