"""The norm choice of a run as one object: :class:`NormSpec`, built from the run's config.

The trainer, ``bn_eval`` and the benchmarks ask it (the layer factory, the label, whether the layer is
batch-dependent, its hooks for DDP, evaluation and the result record) instead of testing a norm's name.
What differs between layer kinds lives on the layer classes (``NormLayer.for_processes``,
``before_evaluation``, ``recorded``, ``normalizes_with_batch_statistics``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from .factory import NORM_CLASSES, norm_layer, norm_options

__all__ = ["NormSpec", "TRAINER_NORM_KEYS"]

TRAINER_NORM_KEYS = ("name", "reestimate_batches")  # keys of the norm node the trainer reads, not the layer


@dataclass(frozen=True)
class NormSpec:
    name: str
    options: dict  # what the layer is built with (the norm node plus the top-level per_gpu_batch where taken)
    label: str  # the name reports show: bn, gn+ws, sn+pono_ms, ...
    settings: dict = field(default_factory=dict)  # the config's whole norm node (trainer keys included)

    @classmethod
    def from_config(cls, config: dict) -> NormSpec:
        """From a run's resolved config (plain containers): ``norm``, ``per_gpu_batch`` and ``model``."""
        node = dict(config["norm"])
        name = node["name"]
        options = {k: v for k, v in node.items() if k not in TRAINER_NORM_KEYS}
        if "per_gpu_batch" in norm_options(name):  # one source of truth: the per-GPU batch of the paper's setting
            options["per_gpu_batch"] = config["per_gpu_batch"]
        model = config.get("model") or {}
        label = name + ("+pono_ms" if model.get("pono_ms") else "")
        label += "+ws" if model.get("weight_standardization") else ""
        return cls(name=name, options=options, label=label, settings=node)

    @property
    def layer_class(self) -> type:
        return NORM_CLASSES[self.name]

    def layer(self) -> Callable[..., nn.Module]:
        """The ``norm_layer`` callable ``(num_channels, **extra) -> nn.Module`` the models are built with."""
        return norm_layer(self.name, **self.options)

    @property
    def batch_dependent(self) -> bool:
        """Whether the layer normalizes with per-GPU batch statistics in training (SN: unless use_bn=false)."""
        attribute = getattr(self.layer_class, "normalizes_with_batch_statistics", False)
        return self.options.get("use_bn", True) if isinstance(attribute, property) else bool(attribute)

    def for_processes(self, model: nn.Module, distributed: bool) -> nn.Module:
        return self.layer_class.for_processes(model, distributed)

    def before_evaluation(self, model: nn.Module, train_batches: Callable[[], Iterable]) -> bool:
        return self.layer_class.before_evaluation(model, train_batches, self.settings)

    def recorded(self, model: nn.Module) -> dict:
        return self.layer_class.recorded(model)

    def epoch_scalars(self, model: nn.Module) -> dict[str, float]:
        return self.layer_class.epoch_scalars(model)
