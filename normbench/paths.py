"""Where normbench's Hydra configs live, whichever way it is installed.

The configs are kept at the top of the repository (`configs/`) and shipped inside the wheel as
`normbench/configs/` (pyproject.toml maps the package `normbench.configs` to `configs/`). An installed wheel
finds them beside this file; a checkout on PYTHONPATH or an editable install finds them one level up.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _config_dir() -> Path:
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"normbench: no configs/train.yaml beside {_PACKAGE} or in its parent; reinstall "
        "normbench (pip install .) or run from a checkout"
    )


CONFIG_DIR = _config_dir()
