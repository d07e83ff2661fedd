"""WinCLIP-style zero-shot: both prompt ensembles are used; maps are per-patch probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harmoniad.backbone import TINY_BACKBONE, Backbone
from harmoniad.data import load_dataset, make_synthetic
from harmoniad.methods.base import Context
from harmoniad.methods.winclip import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, WinCLIP, WinCLIPConfig, prompts

RES = 64


def test_prompts_compose_states_and_templates() -> None:
    normal = prompts("metal_nut", NORMAL_STATES)
    abnormal = prompts("metal_nut", ABNORMAL_STATES)
    assert len(normal) == len(NORMAL_STATES) * len(TEMPLATES)
    assert len(abnormal) == len(ABNORMAL_STATES) * len(TEMPLATES)
    assert "a photo of a flawless metal nut." in normal
    assert "a photo of a damaged metal nut." in abnormal
    assert not set(normal) & set(abnormal)


def test_probability_is_softmax_over_normal_and_abnormal() -> None:
    method = WinCLIP()
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    tokens = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    p = method.abnormal_probability(tokens, text)
    want = torch.sigmoid(100.0 * (tokens @ text[1] - tokens @ text[0]))
    torch.testing.assert_close(p, want)
    # Swapping the roles of the two prompts flips the probability: both are used.
    torch.testing.assert_close(method.abnormal_probability(tokens, text.flip(0)), 1 - p)


def test_uses_both_prompt_ensembles_and_returns_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_synthetic(tmp_path / "data", seed=0, n_train=6, n_test=6, size=64)
    test = load_dataset("synthetic", data, split="test")
    category = test[0].category
    samples = [s for s in test if s.category == category]

    seen: list[str] = []
    original = Backbone.encode_text

    def spy(self: Backbone, texts: list[str]) -> torch.Tensor:
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(Backbone, "encode_text", spy)
    ctx = Context(resolution=RES, backbone=TINY_BACKBONE, cache_root=tmp_path / "cache")
    method = WinCLIP()
    method.fit([], ctx)  # zero-shot: a no-op
    pred = method.predict(samples, ctx)

    assert set(seen) == set(prompts(category, NORMAL_STATES)) | set(prompts(category, ABNORMAL_STATES))
    text = method.text_embeddings(category, ctx)
    assert text.shape[0] == 2 and not torch.allclose(text[0], text[1])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))

    assert pred.scores.shape == (len(samples),) and pred.maps.shape == (len(samples), RES, RES)
    assert pred.maps.dtype == np.float32 and pred.high_maps is None
    assert np.all((pred.maps >= 0) & (pred.maps <= 1)) and np.all((pred.scores >= 0) & (pred.scores <= 1))
    # Text embeddings are computed once per category, not per call.
    n_seen = len(seen)
    method.predict(samples[:1], ctx)
    assert len(seen) == n_seen

    # The map-maximum image score needs no class token and stays a probability.
    method.cfg = WinCLIPConfig(image_score="max")  # same backbone and prompts, other image score
    by_max = method.predict(samples[:2], ctx)
    np.testing.assert_allclose(by_max.maps, pred.maps[:2], atol=1e-6)
    assert np.all(by_max.scores >= by_max.maps.max(axis=(1, 2)) - 1e-6) and np.all(by_max.scores <= 1)
