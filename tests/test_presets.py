"""Every experiment composes at every preset, and at preset=local every cell of every grid builds a model that
runs a training step; one experiment's whole grid trains end to end at preset=local through the CLI."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

import normbench  # noqa: F401 -- registers the ${gpus_for:...} resolver the CPU presets use
from hydra_plugins.normbench_sweeper.normbench_sweeper import plan_jobs

from conftest import CONFIG_DIR, cli, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "preset").glob("*.yaml"))
# The inner loop (`-m "not slow"`) composes one experiment (the demo's) at every preset; the rest, which
# compose every cell of every grid (sn_table alone: 26 cells a preset), are slow and run in `make test`.
FAST = "gn_table2"


def _experiments() -> list:
    return [e if e == FAST else pytest.param(e, marks=pytest.mark.slow) for e in EXPERIMENTS]


def _jobs(experiment: str, preset: str) -> list[list[str]]:
    cfg = compose([f"experiment={experiment}", f"preset={preset}"])
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True)
    base = [f"experiment={experiment}", f"preset={preset}"]
    return plan_jobs([base], sweep["grid"], sweep["seeds"], sweep["allowed"])


def test_there_are_experiments_and_presets():
    assert {"gn_table2", "sn_table"} <= set(EXPERIMENTS) and {"imagenet", "fashion_mnist", "local"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("experiment", _experiments())
def test_every_experiment_composes_and_resolves_at_every_preset(experiment, preset):
    jobs = _jobs(experiment, preset)
    assert jobs, f"{experiment} at preset={preset} plans no run"
    for job in jobs:
        config = OmegaConf.to_container(compose(job), resolve=True, throw_on_missing=True)
        assert config["experiment"] == experiment
        data = config["data"]
        if data.get("epoch_size") and data.get("train_subset"):
            # an epoch is drawn from the images trained on: it cannot hold more than them
            assert data["epoch_size"] <= data["train_subset"], job


@pytest.mark.parametrize("experiment", _experiments())
def test_every_cell_at_preset_local_builds_and_takes_a_training_step(experiment):
    """Group counts and channels per group must fit the width-8 model, per_gpu_batch the layers: build each
    cell's model as the trainer does and run one forward/backward on a step-sized batch."""
    from normbench.models import build_model
    from normbench.norms import NormSpec

    for job in _jobs(experiment, "local"):
        cfg = compose(job)
        config = OmegaConf.to_container(cfg, resolve=True)
        assert config["data"]["name"] == "fashion_mnist" and config["epochs"] == 1
        model = build_model(cfg.model, NormSpec.from_config(config).layer(), 10, 1)
        model.train()
        images = torch.randn(config["gpus"] * config["per_gpu_batch"], 1, 28, 28)
        model(images).square().mean().backward()


@pytest.mark.slow
def test_a_whole_grid_trains_end_to_end_at_preset_local(tmp_path):
    """GN Table 1 (bn, ln, in, gn) at preset=local through `normbench sweep`, then its report."""
    result = cli(
        "sweep",
        "experiment=gn_table1",
        "preset=local",
        f"results_dir={tmp_path}",
        "logger.wandb.mode=disabled",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"sweep gn_table1: 4 runs: 4 completed, 0 skipped", result.stdout), result.stdout[-2000:]
    report = cli("report", "experiment=gn_table1", f"results_dir={tmp_path}")
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "reports").is_dir()
