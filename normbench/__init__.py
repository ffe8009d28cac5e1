"""normbench: reproduce and compare normalization layers on equal terms."""

__version__ = "0.1.0"


def _running_as_the_command() -> bool:
    """`normbench ...` or `python -m normbench|normbench.cli`: a process this package's command owns."""
    import os
    import sys

    argv = getattr(sys, "orig_argv", sys.argv)
    as_module = any(a == "-m" and b in ("normbench", "normbench.cli") for a, b in zip(argv, argv[1:]))
    return as_module or os.path.basename(sys.argv[0]) == "normbench"


if _running_as_the_command():  # first thing: a Ctrl-C while the imports run is one line, not a traceback
    from normbench.runs.interrupts import start_up_interrupts

    start_up_interrupts()


def _gpus_for(total_batch, per_gpu_batch) -> int:
    """`${gpus_for:64,${per_gpu_batch}}`: the GPU count that makes a fixed total batch (small presets)."""
    total, per_gpu = int(total_batch), int(per_gpu_batch)
    if per_gpu < 1 or total % per_gpu:
        raise ValueError(
            f"per_gpu_batch={per_gpu} does not divide the preset's {total} images per step; choose a divisor of {total}"
        )
    return total // per_gpu


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("gpus_for", _gpus_for, replace=True)


try:
    _register_resolvers()  # the slow part of this import (omegaconf, yaml): a signal often lands here
except BaseException as _stop:  # noqa: BLE001 -- only a start-up interrupt is handled; anything else re-raised
    if not _running_as_the_command():
        raise
    from normbench.cli import interrupted
    from normbench.runs.interrupts import Interrupted

    if not isinstance(_stop, Interrupted):
        raise

    raise SystemExit(interrupted(__import__("sys").argv[1:], _stop)) from None
