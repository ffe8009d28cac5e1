"""The composed config, checked in one place before anything is written: every key against its type and range,
and no key the configs do not define (a `+key=value` typo would otherwise be accepted and ignored).

Each failure is one line naming the key, the value and a fix (ConfigError). `normbench train` and `sweep` call
:func:`validate` on the composed config before Hydra writes its own files; ``train()`` calls it again for runs
composed elsewhere (a sweep's jobs, tests). A new config key needs a rule in RULES: tests/test_config.py composes
every config group option and fails on a key without one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A bad setting: one line naming the problem and the fix; raised before any file is written."""


SEED_LIMIT = 2**63  # torch.manual_seed and the data streams' 63-bit seed mixing take seeds below this


@dataclass(frozen=True)
class Rule:
    """``check(value)`` is true for a legal value; ``wants`` says what is legal, ``example`` a legal setting."""

    check: Callable[[Any], bool]
    wants: str
    example: str


def _yaml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return repr(value).replace(" ", "")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: int | None = None, example: str = "") -> Rule:
    wants = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(lambda v: _is_int(v) and v >= low and (high is None or v <= high), wants, example or str(low))


def number(low: float, high: float | None = None, *, low_open=False, high_open=False, example: str = "") -> Rule:
    def check(v) -> bool:
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if high is None:
        wants = f"a number {'>' if low_open else '>='} {low}"
    else:
        wants = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return Rule(check, wants, example or str(low))


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.check(v), f"{rule.wants} or null", rule.example)


def choice(*values) -> Rule:
    shown = ", ".join(_yaml(v) for v in values)
    return Rule(lambda v: any(v == c and type(v) is type(c) for c in values), f"one of {shown}", _yaml(values[0]))


def number_list(item: Rule, length: int | None = None, example: str = "[0.5]") -> Rule:
    def check(v) -> bool:
        return isinstance(v, list) and bool(v) and (length is None or len(v) == length) and all(map(item.check, v))

    size = f"{length} " if length else ""
    return Rule(check, f"a list of {size}values, each {item.wants}", example)


def _pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)) and 0 < v[0] <= v[1]


BOOL = Rule(lambda v: isinstance(v, bool), "true or false", "true")
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string", "NAME")
OPTIONAL_TEXT = optional(TEXT)
POSITIVE = integer(1, example="8")
NON_NEGATIVE = integer(0)
PROBABILITY = number(0, 1)
LIST = Rule(lambda v: isinstance(v, list), "a list", "[]")
MAPPING = Rule(lambda v: isinstance(v, dict), "a mapping", "{}")
SEED = Rule(lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, "an integer in [0, 2**63)", "0")

RULES: dict[str, Rule] = {
    # the run
    "experiment": TEXT,
    "preset_name": OPTIONAL_TEXT,
    "per_gpu_batch": POSITIVE,
    "gpus": POSITIVE,
    "epochs": POSITIVE,
    "seed": SEED,
    "force": BOOL,
    "base_lr": number(0, low_open=True, example="0.1"),
    "reference_batch": POSITIVE,
    "schedule.name": choice("step", "cosine"),
    "schedule.milestones": Rule(lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list", "[0.3,0.6,0.9]"),
    "schedule.gamma": number(0, 1, low_open=True, example="0.1"),
    "schedule.warmup_epochs": number(0, example="0.2"),
    "optim.momentum": number(0, 1, high_open=True, example="0.9"),
    "optim.nesterov": BOOL,
    "optim.weight_decay": number(0, example="1e-4"),
    "optim.decay_norm": BOOL,
    "results_dir": TEXT,
    "device": Rule(
        lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or v.startswith("cuda:") and v[5:].isdigit()),
        "auto, cpu, cuda or cuda:N",
        "auto",
    ),
    "fast.channels_last": choice("auto", True, False),
    "fast.amp": choice("auto", "none", "bf16", "fp16"),
    "fast.compile": choice("auto", True, False),
    "fast.cuda_graphs": choice("auto", True, False),
    "fast.cudnn_benchmark": BOOL,
    "bn_eval.enabled": BOOL,
    "bn_eval.precise_bn_images": integer(1, example="8192"),
    "checkpoint.every_minutes": number(0, example="10"),
    "logger.wandb.mode": choice("offline", "online", "disabled"),
    "logger.wandb.project": TEXT,
    "logger.progress": BOOL,
    "logger.check_every": integer(1, example="50"),
    "logger.every_steps": integer(1, example="50"),
    "logger.tensorboard": BOOL,
    "sweep.grid": LIST,
    "sweep.seeds": Rule(lambda v: isinstance(v, list) and all(map(SEED.check, v)), "a list of seeds", "[0,1,2]"),
    "sweep.allowed": MAPPING,
    "sweep.dry_run": BOOL,
    "sweep.workers": Rule(
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "auto or a whole number >= 1",
        "2",
    ),
    "claims": LIST,  # judged by normbench.report.claims, which names a bad claim itself
    # model=
    "model.id": TEXT,
    "model.name": TEXT,
    "model.depth": optional(integer(1, example="20")),
    "model.width": optional(integer(1, example="16")),
    "model.norm_groups": integer(1, example="8"),
    "model.zero_init_last_gamma": BOOL,
    "model.weight_standardization": BOOL,
    "model.pono_ms": BOOL,
    "model.timm_name": OPTIONAL_TEXT,
    # data=
    "data.name": TEXT,
    "data.root": OPTIONAL_TEXT,
    "data.download": BOOL,
    "data.augment.crop_padding": NON_NEGATIVE,
    "data.augment.rrc_scale": Rule(lambda v: v is None or _pair(v) and v[1] <= 1, "[lo, hi] in (0, 1] or null", "null"),
    "data.augment.rrc_ratio": Rule(_pair, "[lo, hi] with 0 < lo <= hi", "[0.75,1.3333333]"),
    "data.augment.flip": BOOL,
    "data.augment.min_scale": number(0, 1, low_open=True, example="0.08"),
    # colour jitter strengths: a blend factor 1 + U(-s, s) stays >= 0
    "data.augment.brightness": number(0, 1, example="0.4"),
    "data.augment.contrast": number(0, 1, example="0.4"),
    "data.augment.saturation": number(0, 1, example="0.4"),
    "data.augment.lighting": number(0, example="0.1"),
    "data.mean": number_list(Rule(_is_number, "a number", "0.5")),
    "data.std": number_list(number(0, low_open=True), example="[0.25]"),
    "data.eval_batch": integer(1, example="1000"),
    "data.workers": NON_NEGATIVE,
    "data.train_subset": optional(integer(1, example="1000")),
    "data.epoch_size": optional(integer(1, example="12000")),
    "data.image_size": integer(1, example="32"),
    "data.decoder": choice("pil", "gpu"),
    "data.num_train": integer(1, example="2048"),
    "data.num_eval": integer(1, example="512"),
    "data.channels": integer(1, example="3"),
    "data.num_classes": integer(2, example="10"),
    "data.data_seed": SEED,
    # norm=
    "norm.name": TEXT,
    "norm.momentum": PROBABILITY,
    "norm.eps": number(0, low_open=True, example="1e-5"),
    "norm.groups": optional(integer(1, example="32")),
    "norm.channels_per_group": optional(integer(1, example="16")),
    "norm.rmax": number(1, example="3.0"),
    "norm.dmax": number(0, example="5.0"),
    "norm.schedule": BOOL,
    "norm.warmup_steps": NON_NEGATIVE,
    "norm.rmax_max": number(1, example="3.0"),
    "norm.rmax_steps": NON_NEGATIVE,
    "norm.dmax_max": number(0, example="5.0"),
    "norm.dmax_steps": NON_NEGATIVE,
    "norm.learnable_eps": BOOL,
    "norm.affine": BOOL,
    "norm.use_bn": BOOL,
    "norm.inference": choice("moving_average", "batch_average"),
    "norm.reestimate_batches": integer(1, example="50"),
}

LEAF_MAPPINGS = {key for key, rule in RULES.items() if rule is MAPPING}  # checked whole, not key by key


def leaves(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every setting (a rule's mapping, e.g. sweep.allowed, is one setting)."""
    out = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in LEAF_MAPPINGS:
            out.update(leaves(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def nearest_key(key: str, known=None) -> str | None:
    """The real key a mistyped one most likely meant (`lr` -> base_lr, `optim.momentun` -> optim.momentum)."""
    known = list(known or RULES)
    key = key.lstrip("+~")

    def score(candidate: str) -> float:
        leaf = candidate.rsplit(".", 1)[-1]
        ratio = max(
            difflib.SequenceMatcher(None, key, candidate).ratio(),
            difflib.SequenceMatcher(None, key.rsplit(".", 1)[-1], leaf).ratio() - 0.05,  # a leaf match, less sure
        )
        if key in leaf.split("_"):  # `lr` is part of base_lr
            ratio = max(ratio, 0.75)
        return ratio

    best = max(known, key=score, default=None)
    return best if best is not None and score(best) >= 0.6 else None


def unknown_key_error(key: str, value: str | None = None, known=None) -> ConfigError:
    near = nearest_key(key, known)
    key = key.lstrip("+~")
    hint = f"did you mean {near}{'=' + value if value is not None else ''}?" if near else "no key is close to it;"
    where = " in this config (another model=, data= or norm= choice has it)" if key in RULES else ""
    return ConfigError(f"unknown key {key}{where}: {hint} (normbench train --cfg job lists every key)")


def validate(config: dict) -> None:
    """Raise ConfigError (one line) on the first bad or unknown key of a composed, resolved config."""
    settings = leaves(config)
    for key, value in settings.items():
        rule = RULES.get(key)
        if rule is None:
            raise unknown_key_error(key, _yaml(value))
        if not rule.check(value):
            shown = _yaml(value)
            raise ConfigError(f"{key}={shown} is not valid: {key} must be {rule.wants}; e.g. {key}={rule.example}")
    _check_relations(config)


def _check_relations(config: dict) -> None:
    """Settings legal alone but not together."""
    schedule = config["schedule"]
    milestones = schedule["milestones"]
    if milestones != sorted(milestones) or any(not 0 < m < 1 for m in milestones):
        raise ConfigError(
            f"schedule.milestones={_yaml(milestones)} must be increasing fractions of training in (0, 1); "
            "e.g. schedule.milestones=[0.3,0.6,0.9]"
        )
    if not schedule["warmup_epochs"] < config["epochs"]:
        raise ConfigError(
            f"schedule.warmup_epochs={schedule['warmup_epochs']} must be in [0, epochs={config['epochs']}); "
            "lower it or raise epochs"
        )


# ---- the batch geometry: computed once per run, logged in one line -------------------------------------
@dataclass(frozen=True)
class BatchGeometry:
    """A step of ``gpus x per_gpu_batch`` images; ``world_size`` processes each hold ``gpus / world_size`` of the
    paper's GPUs (emulated on their device, image ``i`` of a process's batch on its GPU ``i mod k``: see
    normbench.norms._common.split_gpus, where the contract is written)."""

    gpus: int
    per_gpu_batch: int
    world_size: int = 1

    @classmethod
    def of(cls, config: dict, world_size: int = 1) -> BatchGeometry:
        geometry = cls(int(config["gpus"]), int(config["per_gpu_batch"]), int(world_size))
        if geometry.gpus % geometry.world_size:
            raise ConfigError(
                f"gpus={geometry.gpus} is not divisible by the world size {world_size}; "
                f"launch a number of processes dividing {geometry.gpus}"
            )
        return geometry

    @property
    def images_per_step(self) -> int:
        return self.gpus * self.per_gpu_batch

    @property
    def gpus_per_process(self) -> int:
        return self.gpus // self.world_size

    @property
    def images_per_process(self) -> int:
        return self.gpus_per_process * self.per_gpu_batch

    def describe(self) -> str:
        processes = f"{self.world_size} processes x " if self.world_size > 1 else ""
        return (
            f"batch: {self.gpus} GPUs x {self.per_gpu_batch} images = {self.images_per_step} images per step; "
            f"{processes}{self.gpus_per_process} GPU{'s' if self.gpus_per_process > 1 else ''} emulated per "
            f"process ({self.images_per_process} images each)"
        )
