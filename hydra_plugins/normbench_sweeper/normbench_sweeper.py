"""Hydra sweeper for paper tables: expands an experiment's `sweep.grid` and `sweep.seeds` into runs, hands
them to whatever launcher is configured (in-process, submitit_local, submitit_slurm), and ends with a summary.

Grid: a list of blocks, each a mapping {override: [values]} expanded as a cartesian product; blocks are
concatenated (so tables whose cells are not a product, like the SN table, list them block by block).
Command-line sweeps (`norm=bn,gn`) multiply the grid; a command-line value of a grid axis selects that slice
(`per_gpu_batch=2` runs only that column). Runs are idempotent (see normbench.train): rerunning the sweep
skips completed runs and resumes interrupted ones.
"""

import itertools
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

log = logging.getLogger("normbench")


@dataclass
class NormbenchSweeperConf:
    _target_: str = "hydra_plugins.normbench_sweeper.normbench_sweeper.NormbenchSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="normbench", node=NormbenchSweeperConf,
                             provider="normbench")


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
            for seed in ([None] if "seed" in fixed else seeds):
                full = job + ([f"seed={seed}"] if seed is not None else [])
                if tuple(full) not in seen:
                    seen.add(tuple(full))
                    jobs.append(full)
    return jobs


class NormbenchSweeper(BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        base_jobs = self.split_arguments(overrides, None)[0]
        sweep_cfg = OmegaConf.to_container(self.config.sweep, resolve=True)
        jobs = plan_jobs(base_jobs, sweep_cfg.get("grid") or [], sweep_cfg.get("seeds") or [0],
                         sweep_cfg.get("allowed"))
        experiment = self.config.experiment
        log.info("sweep %s: %d runs", experiment, len(jobs))
        self.validate_batch_is_legal(jobs)  # every run's config composes before any trains
        outcomes: Counter = Counter()
        failures = []
        batch = self.max_batch_size or len(jobs)
        for start in range(0, len(jobs), batch):
            for job, ret in zip(jobs[start:start + batch],
                                self.launcher.launch(jobs[start:start + batch], initial_job_idx=start)):
                if ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, dict):
                    outcomes[ret._return_value.get("outcome", "completed")] += 1
                else:
                    outcomes["failed"] += 1
                    failures.append(f"  {' '.join(job)}: {ret._return_value}")
        order = ["completed", "skipped", "resumed", "diverged", "busy", "interrupted", "failed"]
        summary = ", ".join(f"{outcomes[k]} {k}" for k in order)
        print(f"sweep {experiment}: {len(jobs)} runs: {summary}", flush=True)
        if outcomes["busy"]:
            print(f"  {outcomes['busy']} run(s) were being trained by another process; rerun the sweep later "
                  "to pick up any it did not finish", flush=True)
        if failures:
            print("failed runs:\n" + "\n".join(failures), file=sys.stderr, flush=True)
            sys.exit(1)
        return outcomes
