"""Training loads the next step's features on a background thread, in the same order as one at a time."""

from __future__ import annotations

import threading

import torch

from harmoniad.backbone.sources import TensorSource
from harmoniad.model import ModelConfig
from harmoniad.train import TrainConfig, train
from harmoniad.train.loop import _epoch_order

MODEL = ModelConfig(hidden_dim=16, fsam_heads=2, gscm_heads=2, fsam_window=4)


class _Recording(TensorSource):
    """Records, per load, the indices, the thread and how many steps had finished."""

    def __init__(self, feats, finished: list[int]) -> None:
        super().__init__(feats)
        self.finished = finished
        self.calls: list[tuple[list[int], str, int]] = []

    def load(self, indices):
        self.calls.append((list(indices), threading.current_thread().name, len(self.finished)))
        return super().load(indices)


def test_next_batch_is_loaded_ahead_on_the_loader_thread_in_the_same_order(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(10, 16, 6, 6, generator=gen) for _ in range(2)]
    finished: list[int] = []
    source = _Recording(feats, finished)
    cfg = TrainConfig(max_steps=7, batch_size=4, seed=3)
    train(source, None, MODEL, cfg, tmp_path / "ckpt", device="cpu",
          progress=lambda e: finished.append(e.done) if e.task == "train" else None)
    probe, *rest = source.calls
    steps = [call for call in rest if call[1].startswith("harmoniad-train-loader")]
    passes = [indices for indices, name, _ in rest if not name.startswith("harmoniad-train-loader")]
    # Besides the steps, ordered passes: the target normalisation before; after, the fusion's
    # statistics and its weights' pseudo-defects (all 10 images: fewer than fusion_pseudo_images).
    assert passes == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 3
    assert probe[0] == [0] and len(steps) == 7  # one load per step, none past the last one
    expected = []
    for step in range(7):  # what a step-by-step loop would load: epochs of 10 in batches of 4, 4, 2
        epoch, pos = divmod(step, 3)
        expected.append(_epoch_order(cfg.seed, epoch, 10)[pos * 4 : (pos + 1) * 4].tolist())
    assert [indices for indices, _, _ in steps] == expected
    # Step k's batch is requested before step k - 1 has finished (loaded ahead), never earlier.
    assert all(done <= max(0, k - 1) for k, (_, _, done) in enumerate(steps))


class _Failing(TensorSource):
    """Fails to load the batch of step ``at`` (1-based) on the loader thread."""

    def __init__(self, feats, at: int) -> None:
        super().__init__(feats)
        self.at, self.steps = at, 0

    def load(self, indices):
        if threading.current_thread().name.startswith("harmoniad-train-loader"):
            self.steps += 1
            if self.steps == self.at:
                raise OSError("simulated unreadable feature file")
        return super().load(indices)


def test_a_failed_load_frees_the_model_with_its_exception_not_at_a_later_collection(tmp_path, monkeypatch):
    # A model (with its optimizer; device memory on a GPU) kept in a reference cycle lives until
    # some later collection, or, with the collector off, for good.
    import gc
    import weakref

    from harmoniad.train import loop

    built: list[weakref.ref] = []
    original = loop.build_model

    def build_and_watch(*args):
        model = original(*args)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(loop, "build_model", build_and_watch)
    feats = [torch.randn(10, 16, 6, 6, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    gc.collect()
    gc.disable()  # only reference counting may free it
    try:
        try:
            train(_Failing(feats, at=3), None, MODEL, TrainConfig(max_steps=6, batch_size=4), tmp_path / "ckpt", device="cpu")
        except OSError as exc:
            assert "simulated unreadable" in str(exc)
        else:
            raise AssertionError("the failed load did not reach the caller")
        assert len(built) == 1 and built[0]() is None, "the model outlived the failed training call"
    finally:
        gc.enable()
