"""The `normbench` command: train | sweep | report.

normbench train [overrides]                          one run (Hydra; -m for a plain multirun)
normbench sweep experiment=NAME [preset=P] [...]     the grid behind a paper table
normbench report experiment=NAME results_dir=DIR     the table beside the paper's numbers; never trains
"""

from __future__ import annotations

import sys

USAGE = __doc__.strip()


def _report(args: list[str]) -> int:
    from normbench.report import build_report

    options = {"experiment": None, "results_dir": "results/runs", "out_dir": None, "model": None, "data": None}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            print(
                f"normbench report: error: unknown argument {arg!r}; use experiment=NAME results_dir=DIR "
                "[out_dir=DIR] [model=MODEL_ID] [data=DATA_NAME]",
                file=sys.stderr,
            )
            return 2
        options[key] = value
    if not options["experiment"]:
        print("normbench report: error: experiment=NAME is required", file=sys.stderr)
        return 2
    try:
        summary = build_report(
            options["experiment"],
            options["results_dir"],
            options["out_dir"],
            model=options["model"],
            data=options["data"],
        )
    except ValueError as err:
        print(f"normbench report: error: {err}", file=sys.stderr)
        return 2
    print(summary.markdown)
    for path in summary.paths:
        print(f"wrote {path}")
    return 0


def _config_error(command: str, args: list[str]) -> str | None:
    """Compose the config once before Hydra runs it, so that a mistyped key or group fails in one line
    (Hydra's own report spans several). Sweep lists (a=1,2) are left to the sweeper, which composes every run."""
    if any(a.startswith("-") for a in args):
        return None  # Hydra flags (--cfg, --help, ...): let Hydra handle them
    plain = [a for a in args if command == "train" or "," not in a.partition("=")[2]]
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from normbench.paths import CONFIG_DIR

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            config = OmegaConf.to_container(compose(config_name="train", overrides=plain), resolve=True)
    except Exception as err:  # noqa: BLE001 -- any composition error is the user's to fix
        text = str(err).split("Config search path")[0]  # Hydra appends its search path: noise here
        text = text.replace(":\n", ": ").replace("\n\n", "\n").replace("\n", ", ").replace("., ", ". ")
        return " ".join(text.split()).rstrip(", ") + " (normbench train --cfg job lists every key)"
    from pathlib import Path

    from normbench.runs import RunEnvironmentError, check_writable

    try:  # before Hydra creates its output directory under results_dir (a raw OSError traceback otherwise)
        check_writable(Path(config["results_dir"]))
    except RunEnvironmentError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "report":
        return _report(rest)
    if command in ("train", "sweep"):
        from normbench.train import main as train_main

        if command == "sweep" and not any(a.startswith("experiment=") for a in rest):
            print("normbench sweep: error: experiment=NAME is required (see configs/experiment/)", file=sys.stderr)
            return 2
        error = _config_error(command, rest)
        if error:
            print(f"normbench {command}: error: {error}", file=sys.stderr)
            return 2
        # Hydra takes one mode: --cfg/--info print the composed config instead of running (no -m with them).
        shows_config = any(a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in rest)
        sys.argv = [f"normbench {command}"] + (["-m"] if command == "sweep" and not shows_config else []) + rest
        train_main()
        return 0
    print(f"normbench: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
