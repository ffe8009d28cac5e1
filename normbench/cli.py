"""The `normbench` command: train | sweep | report.

normbench train [overrides]                          one run (Hydra; -m for a plain multirun)
normbench sweep experiment=NAME [preset=P] [...]     the grid behind a paper table
normbench report experiment=NAME results_dir=DIR     the table beside the paper's numbers; never trains
                 [wandb=offline|online] [tensorboard=auto|true|false]   ... also on the dashboards
"""

from __future__ import annotations

import sys

USAGE = __doc__.strip()


def _report(args: list[str]) -> int:
    from normbench.report import build_report

    options = {"experiment": None, "results_dir": "results/runs", "out_dir": None, "model": None, "data": None}
    options |= {"wandb": "disabled", "tensorboard": "auto"}  # where the report is logged besides its files
    choices = {"wandb": ("disabled", "offline", "online"), "tensorboard": ("auto", "true", "false")}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            print(
                f"normbench report: error: unknown argument {arg!r}; use experiment=NAME results_dir=DIR "
                "[out_dir=DIR] [model=MODEL_ID] [data=DATA_NAME] [wandb=disabled|offline|online] "
                "[tensorboard=auto|true|false]",
                file=sys.stderr,
            )
            return 2
        if key in choices and value not in choices[key]:
            print(f"normbench report: error: {key}={value!r}; use one of {', '.join(choices[key])}", file=sys.stderr)
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
    tensorboard = options["tensorboard"] == "true" or (
        options["tensorboard"] == "auto" and summary.runs_log_to_tensorboard
    )
    if summary.group is not None and (tensorboard or options["wandb"] != "disabled"):  # None: no runs yet
        from pathlib import Path

        from normbench.tracking import publish_report

        where = Path(options["results_dir"]) / options["experiment"] / "report"
        for line in publish_report(summary, where, wandb_mode=options["wandb"], tensorboard=tensorboard):
            print(f"logged to {line}")
    return 0


def _sweep_values(arg: str) -> list[str]:
    """`key=a,b` -> [`key=a`, `key=b`]: each value of a sweep list, checked before Hydra runs anything."""
    key, sep, value = arg.partition("=")
    if not sep or "," not in value or any(c in value for c in "[](){}'\""):
        return [arg]  # no list, or one the override grammar shapes itself (range(), quoted values): left to Hydra
    return [f"{key}={v}" for v in value.split(",")]


def _variants(command: str, args: list[str]) -> list[list[str]]:
    """The command lines to check: a run's own, or for a sweep its lists at their first values, then each other
    value of each list once (a bad value fails before any run trains; the grid is checked by the sweeper)."""
    if command == "train":
        return [args]
    values = [_sweep_values(a) for a in args]
    first = [v[0] for v in values]
    return [first] + [[*first[:i], other, *first[i + 1 :]] for i, v in enumerate(values) for other in v[1:]]


def _composition_error(err: Exception, args: list[str]) -> str:
    """Hydra's composition failure in one line, rewritten where its own hint misleads."""
    from normbench.config import unknown_key_error

    text = str(err)
    if text.startswith("Could not override '"):  # Hydra would suggest `+key=value`, which adds a key nothing reads
        key = text.split("'")[1]
        value = next((a.partition("=")[2] for a in args if a.lstrip("+~").partition("=")[0] == key), None)
        return str(unknown_key_error(key, value, _keys_of_selection(args, leaving_out=key)))
    if "LexerNoViableAltException" in text or "token recognition error" in text:
        bad = next((a for a in args if not a.isascii()), None)
        if bad is not None:
            key, _, value = bad.partition("=")
            return f"{bad!r} has characters Hydra's override parser takes only quoted; quote the value: {key}='{value}'"
    text = text.split("Config search path")[0]  # Hydra appends its search path: noise here
    text = text.replace(":\n", ": ").replace("\n\n", "\n").replace("\n", ", ").replace("., ", ". ")
    return " ".join(text.split()).rstrip(", ") + " (normbench train --cfg job lists every key)"


def _keys_of_selection(args: list[str], leaving_out: str) -> list[str]:
    """The keys of the config the command line's group choices (model=, data=, norm=, ...) compose: a key of
    another choice (data.num_train is synthetic's) is no answer for this one."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from normbench.config import leaves
    from normbench.paths import CONFIG_DIR

    groups = [a for a in args if "=" in a and "." not in a.partition("=")[0] and not a.startswith(("+", "~"))]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            config = OmegaConf.to_container(compose(config_name="train", overrides=groups), resolve=False)
    except Exception:  # noqa: BLE001 -- no better list than every key
        return []
    return [k for k in leaves(config) if k != leaving_out]


def _config_error(command: str, args: list[str]) -> str | None:
    """Compose and validate the config once before Hydra runs it, so that a mistyped key, group or value fails in
    one line before anything is written (Hydra's own report spans several, and it writes its files first). A
    sweep list (a=1,2) is checked on its first value; the sweeper composes and checks every run."""
    if any(a.startswith("-") for a in args):
        return None  # Hydra flags (--cfg, --help, ...): let Hydra handle them
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from normbench.config import ConfigError, validate
    from normbench.paths import CONFIG_DIR

    for plain in _variants(command, args):
        try:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                config = OmegaConf.to_container(compose(config_name="train", overrides=plain), resolve=True)
        except Exception as err:  # noqa: BLE001 -- any composition error is the user's to fix
            return _composition_error(err, plain)
        try:
            validate(config)
        except ConfigError as err:
            return str(err)
    from pathlib import Path

    from normbench.runs.disk_faults import RunEnvironmentError, check_writable

    try:  # before Hydra creates its output directory under results_dir (a raw OSError traceback otherwise)
        check_writable(Path(config["results_dir"]))
    except RunEnvironmentError as err:
        return str(err)
    return None


def interrupted(argv: list[str], stop: BaseException) -> int:
    """The one line a command says when a signal stops it outside a run's own handling (start-up, the imports,
    a report, sweep planning), and its exit status."""
    from normbench.runs import interruption_message
    from normbench.runs.interrupts import interruption_exit_code

    command = argv[0] if argv else ""
    print(f"normbench {command}: {interruption_message(stop)}", file=sys.stderr, flush=True)
    return interruption_exit_code(stop)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from normbench.runs.interrupts import start_up_interrupts

        start_up_interrupts()  # a signal during start-up: one line, not a traceback or a silent death
        return _main(argv)
    except BaseException as stop:  # noqa: BLE001 -- Interrupted only: before train() recorded anything, a report
        from normbench.runs.interrupts import Interrupted

        if not isinstance(stop, Interrupted):
            raise
        return interrupted(argv, stop)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from normbench.runs import mark_command_start

    mark_command_start()  # force=true retrains results older than this command, never one a worker just made
    if command == "report":
        return _report(rest)
    if command in ("train", "sweep"):
        if command == "sweep" and not any(a.startswith("experiment=") for a in rest):
            print("normbench sweep: error: experiment=NAME is required (see configs/experiment/)", file=sys.stderr)
            return 2
        from normbench.runs.interrupts import holding_through_start_up

        # a signal while Hydra is imported (omegaconf builds its structured configs then) or composes the config
        # waits for normbench's own code
        with holding_through_start_up():
            from normbench.train import main as train_main

            error = _config_error(command, rest)
            if error:
                print(f"normbench {command}: error: {error}", file=sys.stderr)
                return 2
            # Hydra takes one mode: --cfg/--info print the composed config instead of running (no -m with them).
            shows_config = any(
                a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in rest
            )
            sys.argv = [f"normbench {command}"] + (["-m"] if command == "sweep" and not shows_config else []) + rest
            train_main()
        return 0
    print(f"normbench: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
