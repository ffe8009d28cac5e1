"""A built wheel is complete and works on its own: installed into a temporary directory, it trains
`preset=local` from a directory outside the checkout (the configs ship inside the package)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, cli


@pytest.mark.slow
def test_wheel_ships_every_module_and_config_and_trains_outside_the_checkout(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("normbench-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for d in ("normbench", "hydra_plugins") for p in (REPO / d).rglob("*.py")}
    expected |= {f"normbench/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert expected - shipped == set(), "add the missing package to [tool.setuptools] packages in pyproject.toml"

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    env = {"PYTHONPATH": str(site)}  # the wheel wins over the checkout; torch & co. come from this interpreter
    where = subprocess.run(
        [sys.executable, "-c", "import normbench.paths as p; print(p.__file__, p.CONFIG_DIR)"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=120,
    )
    module, config_dir = where.stdout.split()
    assert module.startswith(str(site)) and config_dir == str(site / "normbench" / "configs"), where.stdout

    run = cli(
        "train",
        "preset=local",
        "data.train_subset=1024",
        "logger.wandb.mode=disabled",
        "results_dir=runs",
        cwd=work,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = (work / "runs" / "adhoc").glob("*/result.json")
    assert json.loads(result.read_text())["status"] == "completed"
