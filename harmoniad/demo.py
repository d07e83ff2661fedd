"""The offline demo: the synthetic dataset, the tiny random backbone, HarmoniAD and baselines.

It needs no download and finishes in a few minutes on a laptop CPU; the dashboard runs it
on first start and the CLI can run it with ``python -m harmoniad demo``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import ensure_synthetic
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.runtime.progress import ProgressFn
from harmoniad.store import ResultStore

#: Every baseline, HarmoniAD and its ablations, fastest first: the dashboard shows each
#: method's categories as they land, so the first measured results appear within seconds
#: (the frequency filter needs no backbone; PatchCore and WinCLIP fit in seconds), while
#: HarmoniAD's training runs afterwards.
DEMO_METHODS: tuple[str, ...] = (
    "freqfilter",
    "patchcore",
    "winclip",
    "patchcore_multiclass",
    "harmoniad",
    "harmoniad_nosplit",
    "harmoniad_high",
    "harmoniad_low",
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
    """Generate the synthetic data if needed and evaluate ``methods`` on it; returns run ids.

    Runs with one torch thread: the demo's models are so small that thread synchronisation
    costs more than it saves (measured on 2 cores: PatchCore's coreset 95 s -> 18 s).
    """
    with _torch_threads(1):
        return evaluate(demo_request(methods), store, progress)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
