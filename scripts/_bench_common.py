"""What the benchmark scripts share: the device line of their header and the .md/.json pair they write.

Imported as `scripts._bench_common` (the scripts put the repository root on sys.path), so a script run as
`python scripts/bench_x.py` and a test that loads it by file path see the same module.
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys

import torch

from normbench.runs.provenance import cpu_model, git_state


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the thread count torch uses (both change a CPU timing)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu {cpu_model()}, {threads} thread{'s' if threads != 1 else ''}"


def write_bench_outputs(
    script: str, out_arg: str, default_stem: str, device, markdown: str, payload: dict
) -> list[pathlib.Path]:
    """Write `<out>.md` (the printed report plus the command that made it) and `<out>.json` (the same figures
    with the versions, host and code commit); `out_arg` ending in / or naming a folder gets `default_stem`."""
    out = pathlib.Path(out_arg)
    if out.is_dir() or out_arg.endswith(("/", "\\")):
        out = out / default_stem
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_name(out.name + ".md"), out.with_name(out.name + ".json")
    command = f"python scripts/{script} {' '.join(sys.argv[1:])}".strip()
    md.write_text(f"{markdown}\n\n`{command}`\n")
    provenance = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "git": git_state(),  # the checkout normbench is imported from
        "command": command,
    }
    js.write_text(json.dumps({**provenance, **payload}, indent=2, default=str) + "\n")
    return [md, js]
