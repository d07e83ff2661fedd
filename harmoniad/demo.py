"""The offline demo: the synthetic dataset, the tiny random backbone, HarmoniAD and baselines.

It needs no download and finishes in a few minutes on a laptop CPU; the dashboard runs it
on first start and the CLI can run it with ``python -m harmoniad demo``.
"""

from __future__ import annotations

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import ensure_synthetic
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.progress import ProgressFn
from harmoniad.store import ResultStore

#: HarmoniAD, its ablations and every baseline.
DEMO_METHODS: tuple[str, ...] = (
    "harmoniad",
    "harmoniad_nosplit",
    "harmoniad_high",
    "harmoniad_low",
    "patchcore",
    "patchcore_multiclass",
    "winclip",
    "freqfilter",
)


#: The tiny backbone has 64 channels: heads of width 64 and 10 epochs are enough for it and
#: keep the whole demo within a few minutes on a laptop CPU (the defaults suit ViT-B/L).
_FAST_HARMONIAD = {"model": {"hidden_dim": 64}, "train": {"epochs": 10}}
DEMO_OPTIONS: dict[str, dict] = {
    name: _FAST_HARMONIAD for name in ("harmoniad", "harmoniad_nosplit", "harmoniad_high", "harmoniad_low")
}


def demo_request(methods: tuple[str, ...] = DEMO_METHODS) -> EvalRequest:
    """The demo's evaluation request (generates the synthetic dataset if needed)."""
    root = ensure_synthetic()
    options = {name: DEMO_OPTIONS[name] for name in methods if name in DEMO_OPTIONS}
    return EvalRequest(dataset="synthetic", root=str(root), methods=methods, backbone=TINY_BACKBONE, options=options)


def run_demo(
    store: ResultStore | None = None,
    progress: ProgressFn | None = None,
    methods: tuple[str, ...] = DEMO_METHODS,
) -> list[str]:
    """Generate the synthetic data if needed and evaluate ``methods`` on it; returns run ids."""
    return evaluate(demo_request(methods), store, progress)
