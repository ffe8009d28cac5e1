"""A run's identity: the hash of its *identifying* config names its directory and its dashboard id.

Keys that only say where or how fast to run (results_dir, logging, data location, loader workers, fast-path
switches whose effect is float error) are left out, so moving the data or turning on channels_last resumes the
same run. The precision (`fast.amp`, resolved: a bf16 run is not an fp32 run) is part of the identity, and so
is `data.decoder=gpu` (its pixels differ from PIL's by rounding; the default `pil` is left out of the hash), and
so are ImageNet's colour jitter and lighting strengths (`data.augment.brightness/...`; one set to 0 is left out,
so crop-and-flip runs made before those keys existed keep their ids).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

COLOUR_AUGMENT_KEYS = ("brightness", "contrast", "saturation", "lighting")  # normbench.data.colour.KEYS

# Top-level keys, and dotted sub-keys, that never change what a run computes.
# `experiment` is not identifying on disk (the directory already sits under it) but is part of the wandb id.
NON_IDENTIFYING = (
    "results_dir",
    "logger",
    "device",
    "sweep",
    "experiment",
    "force",
    "preset_name",
    "claims",
    "bn_eval",
    "checkpoint",
    "fast.channels_last",
    "fast.compile",
    "fast.cuda_graphs",
    "fast.cudnn_benchmark",
    "data.root",
    "data.download",
    "data.workers",
    "data.eval_batch",
)


PRECISE_BN_IMAGES_DEFAULT = 8192  # configs/train.yaml's; runs made with it keep the ids they had before


def identifying_config(config: dict) -> dict:
    config = json.loads(json.dumps(config))  # deep copy of plain containers
    # bn_eval only adds evaluations of the final model, but PreciseBN's image count changes the number it
    # records: a non-default count is part of the identity
    precise_bn_images = (config.get("bn_eval") or {}).get("precise_bn_images", PRECISE_BN_IMAGES_DEFAULT)
    for key in NON_IDENTIFYING:
        node, *rest = key.split(".")
        if not rest:
            config.pop(node, None)
        elif isinstance(config.get(node), dict):
            config[node].pop(rest[0], None)
    if config.get("fast") == {}:
        config.pop("fast")
    data = config.get("data")
    if isinstance(data, dict) and data.get("decoder") == "pil":
        # PIL decoding, the default: the path every ImageNet run took before data.decoder existed (same ids).
        # data.decoder=gpu resamples (and, on CUDA, decodes) with different rounding: its own run.
        data.pop("decoder")
    augment = data.get("augment") if isinstance(data, dict) else None
    if isinstance(augment, dict):
        # A colour augmentation turned off (0) computes what runs from before these keys existed computed:
        # left out, so those runs keep their ids; one turned on is in the hash.
        for key in COLOUR_AUGMENT_KEYS:
            if augment.get(key, None) == 0:
                augment.pop(key)
    if precise_bn_images != PRECISE_BN_IMAGES_DEFAULT:
        config["bn_eval"] = {"precise_bn_images": precise_bn_images}
    return config


def run_id(config: dict) -> str:
    blob = json.dumps(identifying_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_name(config: dict) -> str:
    """Readable prefix plus hash: cifar_resnet20-fashion_mnist-gn-8x32-s0-1a2b3c4d5e."""
    return "-".join(
        [
            config["model"]["id"],
            config["data"]["name"],
            config["norm"]["name"],
            f"{config['gpus']}x{config['per_gpu_batch']}",
            f"s{config['seed']}",
            run_id(config),
        ]
    )


def run_dir(config: dict) -> Path:
    return Path(config["results_dir"]) / config["experiment"] / run_name(config)


def wandb_id(config: dict) -> str:
    """The dashboard id: the run hash within its experiment (the same BN run in two tables is two runs)."""
    return f"{config['experiment']}-{run_id(config)}"[:64]


def sweep_group(experiment: str, model_id: str, data_name: str) -> str:
    """The wandb group of a run: one report's runs (experiment, model, dataset: every cell and seed of the grid);
    ``normbench report`` logs its table and figure to the same group (from result.json's fields of these)."""
    return f"{experiment}-{model_id}-{data_name}"[:128]
