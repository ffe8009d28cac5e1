"""Shared test helpers: compose the REAL configs (configs/) and shrink them to seconds-long CPU runs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"

# A few-second run: 8x8 synthetic images, a width-4 ResNet-8, 4 emulated GPUs x 8 images per step.
TINY = [
    "data=synthetic",
    "data.num_train=256",
    "data.num_eval=128",
    "data.image_size=8",
    "data.num_classes=4",
    "model=cifar_resnet8",
    "model.width=4",
    "model.norm_groups=2",
    "gpus=4",
    "per_gpu_batch=8",
    "epochs=2",
    "logger.wandb.mode=disabled",
    "logger.progress=false",
]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def cli(
    *args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None, module: str = "normbench.cli"
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or REPO,
    )


def start_train(*args: str, launcher: list[str] | None = None, env: dict | None = None, **popen) -> subprocess.Popen:
    """`normbench train ARGS` as a background process (one thread, wandb off unless ``env`` says otherwise) for
    tests that signal or kill it; ``launcher`` replaces `python -m normbench.cli` (e.g. torchrun); ``popen`` goes
    to subprocess.Popen."""
    command = launcher or [sys.executable, "-m", "normbench.cli"]
    return subprocess.Popen(
        [*command, "train", *args],
        cwd=REPO,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})},
        **popen,
    )


def torchrun(
    *args: str, nproc: int = 2, launcher: tuple[str, ...] = (), timeout: float = 300
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC LAUNCHER -m normbench train ARGS`: real processes, gloo on
    the CPU."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *launcher,
            "-m",
            "normbench",
            "train",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
    )


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip themselves without CUDA (and `-m gpu` selects them)."""
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: a parameter id "gpu" is one too
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fair on a 2-core CI machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_inherited_command_start(monkeypatch):
    """An in-process `normbench` command notes its start time in os.environ (for force=true); no later test's
    subprocesses may inherit it."""
    from normbench.runs import FORCE_SINCE_ENV

    monkeypatch.delenv(FORCE_SINCE_ENV, raising=False)


@pytest.fixture(autouse=True)
def _isolated_global_rng():
    """train() and the layers reseed torch's global RNG: restore every global RNG so no test's outcome depends
    on which tests ran before it."""
    import numpy as np
    import torch

    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)


def imagenet_cfg(**overrides):
    """configs/data/imagenet.yaml with OVERRIDES, struct mode on (an unknown key fails as in a run)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "data" / "imagenet.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


class KernelSpy:
    """Which EvoNorm path ran: ``fused`` (numba kernels asked for) and ``builds`` (calls of the kernels' serial and
    parallel builds)."""

    def __init__(self, fused: bool):
        self.fused, self.builds = fused, {"serial": 0, "parallel": 0}

    def expect(self, nchw: bool = True) -> None:
        """The kernels ran exactly where they should: asked for, on an NCHW float CPU input."""
        assert (sum(self.builds.values()) > 0) == (self.fused and nchw), (self.fused, nchw, self.builds)


@pytest.fixture(params=["fused", "tensor_ops"])
def evonorm_path(request, monkeypatch):
    """Runs an EvoNorm test on both eager paths: the fused CPU kernels and the plain tensor ops
    (NORMBENCH_CPU_KERNELS=0), counting each kernel build's calls so a test can check which one it measured."""
    spy = KernelSpy(request.param == "fused")
    monkeypatch.setenv("NORMBENCH_CPU_KERNELS", "1" if spy.fused else "0")
    try:
        from normbench.norms import _cpu_kernels
    except ImportError:  # numba is a declared dependency; a bare environment tests the tensor ops only
        if spy.fused:
            pytest.skip("needs numba")
        return spy

    def counting(real, build):
        def counted(*args):
            spy.builds[build] += 1
            return real(*args)

        return counted

    for name in _cpu_kernels.__all__:
        kernel = getattr(_cpu_kernels, name)
        for build in spy.builds:
            monkeypatch.setattr(kernel, build, counting(getattr(kernel, build), build))
    return spy
