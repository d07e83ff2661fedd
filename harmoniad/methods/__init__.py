"""Registry of methods, as data: the CLI, the evaluator and the dashboard read ``METHODS``.

Factories import lazily, so listing methods costs nothing and a method's heavy
dependencies load only when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from harmoniad.methods.base import Context, Method
from harmoniad.maps import Prediction

Kind = Literal["harmoniad", "ablation", "baseline"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, a human label, what it is, and how to build it."""

    name: str
    label: str
    kind: Kind
    description: str
    factory: Callable[[dict[str, Any]], Method]


def _harmoniad(name: str, **model: Any) -> Callable[[dict[str, Any]], Method]:
    """HarmoniAD with the ablation's fixed ``model`` settings; options may set model/train/score."""

    def build(options: dict[str, Any]) -> Method:
        from harmoniad.runtime.serialization import from_dict
        from harmoniad.maps import ScoreConfig
        from harmoniad.methods.harmoniad import HarmoniADMethod
        from harmoniad.model import ModelConfig
        from harmoniad.train import TrainConfig

        _check_keys(name, options, {"model", "train", "score"})
        where = f"options of method {name!r}"
        return HarmoniADMethod(
            from_dict(ModelConfig, {**options.get("model", {}), **model}, where=where),
            from_dict(TrainConfig, options.get("train", {}), where=where),
            from_dict(ScoreConfig, options.get("score", {}), where=where),
            name=name,
            seed_from_context="seed" not in options.get("train", {}),
        )

    return build


def _baseline(module: str, cls: str, config_cls: str, **fixed: Any) -> Callable[[dict[str, Any]], Method]:
    """A baseline built from its module's config dataclass (options are its fields; ``fixed`` win)."""

    def build(options: dict[str, Any]) -> Method:
        import importlib

        from harmoniad.runtime.serialization import from_dict

        mod = importlib.import_module(f"harmoniad.methods.{module}")
        config = from_dict(getattr(mod, config_cls), {**options, **fixed}, where=f"options of method {cls}")
        return getattr(mod, cls)(config)

    return build


def _check_keys(name: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"options of method {name!r}: unknown keys {unknown}; expected some of {sorted(allowed)}")


_SPECS = [
    MethodSpec("harmoniad", "HarmoniAD", "harmoniad",
               "Frequency split, FSAM (high) + GSCM (low), fused reconstruction; one model for all categories.",
               _harmoniad("harmoniad")),
    MethodSpec("harmoniad_nosplit", "HarmoniAD w/o split", "ablation",
               "Ablation: no frequency split, both branches see the full features.",
               _harmoniad("harmoniad_nosplit", split=False)),
    MethodSpec("harmoniad_high", "HarmoniAD high only", "ablation",
               "Ablation: high-frequency branch (FSAM) only.", _harmoniad("harmoniad_high", branches="high")),
    MethodSpec("harmoniad_low", "HarmoniAD low only", "ablation",
               "Ablation: low-frequency branch (GSCM) only.", _harmoniad("harmoniad_low", branches="low")),
    MethodSpec("patchcore", "PatchCore", "baseline",
               "Memory bank of normal patches per category, greedy coreset, nearest-neighbour distance.",
               _baseline("patchcore", "PatchCore", "PatchCoreConfig")),
    MethodSpec("patchcore_multiclass", "PatchCore (one bank)", "baseline",
               "PatchCore with one memory bank for all categories (unified setting).",
               _baseline("patchcore", "MulticlassPatchCore", "PatchCoreConfig", per_category=False)),
    MethodSpec("winclip", "WinCLIP (zero-shot)", "baseline",
               "Zero-shot: normal/abnormal prompt ensembles vs patch embeddings. No training.",
               _baseline("winclip", "WinCLIP", "WinCLIPConfig")),
    MethodSpec("freqfilter", "Frequency filter", "baseline",
               "Pixel-space high-pass residual vs normal statistics. No backbone.",
               _baseline("freqfilter", "FrequencyFilter", "FreqFilterConfig")),
]

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """A fresh instance of the registered method ``name``; ``options`` override its defaults."""
    try:
        spec = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None
    return spec.factory(dict(options or {}))


__all__ = ["DEFAULT_METHODS", "METHODS", "Context", "Method", "MethodSpec", "Prediction", "build_method"]
