"""Config validation (normbench/config.py): every key of every shipped config has a rule; a bad value or an
unknown key, typed as a user types it, fails in one line naming the key and a fix, exit 2, nothing written."""

from __future__ import annotations

import itertools

import pytest
from omegaconf import OmegaConf

from normbench.config import RULES, ConfigError, leaves, validate

from conftest import CONFIG_DIR, TINY, cli, compose

GROUPS = ("model", "data", "norm", "preset", "experiment")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _every_shipped_config():
    """Every option of every group, alone, and every norm on every data set (norms add model keys too)."""
    yield []
    for group in GROUPS:
        for option in _options(group):
            yield [f"{group}={option}"]
    for norm, data in itertools.product(_options("norm"), _options("data")):
        yield [f"norm={norm}", f"data={data}"]


def test_every_key_of_every_shipped_config_has_a_rule_and_passes_it():
    seen = set()
    for overrides in _every_shipped_config():
        config = OmegaConf.to_container(compose(overrides), resolve=True)
        keys = set(leaves(config))
        assert not keys - set(RULES), (overrides, keys - set(RULES))  # a new key needs a rule in RULES
        validate(config)  # the shipped values are legal
        seen |= keys
    assert not set(RULES) - seen, set(RULES) - seen  # no rule for a key that no config has


def _wrong_type(key: str, value):
    """A value of another type than the key's: a number for text and choices, text for everything else."""
    return 7 if isinstance(value, str) or "string" in RULES[key].wants else "abc"


def test_every_key_rejects_a_value_of_the_wrong_type_naming_the_key():
    for overrides in _every_shipped_config():
        config = OmegaConf.to_container(compose(overrides), resolve=True)
        for key, value in leaves(config).items():
            if key in ("sweep.grid", "sweep.allowed", "claims", "schedule.milestones") and value in ([], {}):
                continue
            broken = OmegaConf.create(config)
            OmegaConf.update(broken, key, _wrong_type(key, value), merge=False)
            try:
                validate(OmegaConf.to_container(broken))
                pytest.fail(f"{overrides}: {key}={_wrong_type(key, value)!r} accepted")
            except ConfigError as err:
                message = str(err)
            assert "\n" not in message and f"{key}=" in message and "e.g." in message, (overrides, key, message)


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("normbench train: error: "), lines[0]
    return lines[0]


def _rejected_in_one_line(tmp_path, override) -> str:
    """`normbench train` with the override fails in one line before anything is written (not even Hydra's
    .hydra/ directory); returns the line."""
    line = _one_error_line(cli("train", *TINY, override, f"results_dir={tmp_path / 'runs'}"))
    assert not (tmp_path / "runs").exists()
    return line


@pytest.mark.parametrize(
    "override, named",
    [
        ("seed=abc", "seed"),
        ("seed=18446744073709551617", "seed"),  # past 64 bits
        ("seed=1.5", "seed"),  # would be seed 1's numbers under a new run id
        ("seed=-1", "seed"),
        ("optim.momentum=abc", "optim.momentum"),
        ("optim.momentum=-0.5", "optim.momentum"),
        ("optim.weight_decay=abc", "optim.weight_decay"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("logger.check_every=abc", "logger.check_every"),
        ("logger.check_every=0", "logger.check_every"),
        ("data.num_train=abc", "data.num_train"),
        ("gpus=true", "gpus"),
        ("fast.amp=fp8", "fast.amp"),
    ],
)
def test_a_bad_value_fails_in_one_line_naming_the_key_before_anything_is_written(tmp_path, override, named):
    line = _rejected_in_one_line(tmp_path, override)
    assert f"{named}=" in line and "must be" in line and "e.g." in line, line


@pytest.mark.parametrize(
    "override, nearest",
    [
        ("lr=-0.1", "base_lr=-0.1"),  # Hydra's own hint would say `+lr=-0.1`
        ("+lr=-5", "base_lr=-5"),  # accepted by Hydra, read by nothing: trained the default schedule
        ("optim.momentun=0.5", "optim.momentum=0.5"),
        ("+optim.wd=0", "optim.weight_decay=0"),
        ("epoch=1", "epochs=1"),
    ],
)
def test_an_unknown_key_with_or_without_plus_names_the_nearest_real_key(tmp_path, override, nearest):
    line = _rejected_in_one_line(tmp_path, override)
    assert f"unknown key {override.lstrip('+').split('=')[0]}" in line and f"did you mean {nearest}?" in line, line
    assert "+" not in line.split("unknown key")[1], line  # never the advice to add a key


def test_a_documented_plus_key_is_still_accepted():
    validate(OmegaConf.to_container(compose([*TINY, "norm=bn", "+model.pono_ms=true"]), resolve=True))


def test_a_sweep_checks_its_lists_before_training(tmp_path):
    proc = cli("sweep", "experiment=gn_table2", *TINY, "seed=0,abc", f"results_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2 and "seed=abc" not in proc.stdout
    assert not list((tmp_path / "runs").rglob("result.json"))
    proc = cli("sweep", "experiment=gn_table2", *TINY, "base_lr=0.1", "+lr=0.1,0.2", f"results_dir={tmp_path}")
    assert "unknown key lr: did you mean base_lr=0.1?" in proc.stderr and proc.returncode == 2, proc.stderr


def test_an_unquoted_non_ascii_results_dir_is_told_to_be_quoted(tmp_path):
    target = tmp_path / "résultats"
    line = _one_error_line(cli("train", *TINY, f"results_dir={target}"))
    assert f"quote the value: results_dir='{target}'" in line, line
    assert not target.exists()
    quoted = OmegaConf.to_container(compose([*TINY, f"results_dir='{target}'"]), resolve=True)
    assert quoted["results_dir"] == str(target)  # the advice works


def test_relations_between_keys_are_checked():
    config = OmegaConf.to_container(compose([*TINY, "schedule.warmup_epochs=5"]), resolve=True)
    with pytest.raises(ConfigError, match=r"^schedule.warmup_epochs=5 must be in \[0, epochs=2\)"):
        validate(config)
