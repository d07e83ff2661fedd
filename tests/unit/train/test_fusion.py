"""Fusion weights learned on pseudo-defects in training normals: the pastes, the choice, the checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from harmoniad.backbone.sources import TensorSource
from harmoniad.maps import ScoreConfig, finalize_maps
from harmoniad.model import GridMaps, ModelConfig
from harmoniad.model.network import mix_maps
from harmoniad.train import CONFIG_FILE, CheckpointInfo, TrainConfig, build_model, load_checkpoint, save_checkpoint, train
from harmoniad.train.fusion import (candidate_mixes, choose_mix, image_criterion, learn_fusion, paste_pseudo_defects,
                                    pixel_criterion)

MODEL = ModelConfig(hidden_dim=16, fsam_heads=2, gscm_heads=2, fsam_window=4)


def test_a_paste_moves_tokens_of_the_same_image_into_the_mask_and_leaves_the_rest() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(8, 5, 12, 12, generator=gen) for _ in range(2)]
    pasted, mask = paste_pseudo_defects(feats, torch.Generator().manual_seed(1))
    assert mask.shape == (8, 12, 12) and mask.dtype == torch.bool
    for i in range(8):
        area = int(mask[i].sum())
        assert 0 < area < 12 * 12 // 4
        if i % 2:  # a one-token-wide line
            rows, cols = mask[i].nonzero().unbind(1)
            assert len(rows.unique()) == 1 or len(cols.unique()) == 1
        for layer, original in zip(pasted, feats):
            torch.testing.assert_close(layer[i][:, ~mask[i]], original[i][:, ~mask[i]])  # untouched outside
            own = original[i].flatten(1).T  # (h*w, C): this image's tokens
            others = torch.cat([original[j].flatten(1).T for j in range(8) if j != i])
            for token in layer[i][:, mask[i]].T:  # every pasted token comes from this very image
                assert torch.isclose(own, token).all(1).any()
                assert not torch.isclose(others, token).all(1).any()
    assert not torch.equal(pasted[0], feats[0])


def test_the_candidates_cover_the_simplex() -> None:
    mixes = candidate_mixes()
    assert len(mixes) == 66 and len(set(mixes)) == 66
    assert all(min(m) >= 0 and abs(sum(m) - 1) < 1e-9 for m in mixes)
    assert {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)} <= set(mixes)


def _pseudo_maps(informative: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Masks of random rectangles; the ``informative`` map lights them up, the others are noise."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(16, 10, 10, dtype=torch.bool)
    for i in range(16):
        y, x = torch.randint(0, 7, (2,), generator=gen).tolist()
        masks[i, y : y + 3, x : x + 3] = True
    z = {name: torch.randn(16, 10, 10, generator=gen) for name in ("high", "joint", "low")}
    z[informative] = z[informative] + 3.0 * masks
    return z, masks.numpy()


@pytest.mark.parametrize("informative, index", [("high", 0), ("joint", 1), ("low", 2)])
def test_the_map_weights_go_to_the_map_that_outlines_the_pseudo_defects(informative: str, index: int) -> None:
    z, masks = _pseudo_maps(informative)
    choice = choose_mix(pixel_criterion(z, masks), (0.45, 0.55, 0.0), margin=0.01)
    assert choice.learned and choice.mix[index] >= 0.7, choice
    assert choice.value > choice.fixed_value + 0.01


@pytest.mark.parametrize("informative, index", [("high", 0), ("joint", 1), ("low", 2)])
def test_the_score_weights_go_to_the_map_that_ranks_pasted_images_above_clean_ones(informative: str, index: int) -> None:
    pasted, _ = _pseudo_maps(informative)
    gen = torch.Generator().manual_seed(5)
    clean = {name: torch.randn(16, 10, 10, generator=gen) for name in ("high", "joint", "low")}
    choice = choose_mix(image_criterion(pasted, clean), (0.45, 0.55, 0.0), margin=0.01)
    assert choice.mix[index] >= 0.5, choice
    assert choice.value == 1.0  # that map alone separates every pasted image from every clean one
    swapped = choose_mix(image_criterion(clean, pasted), (0.45, 0.55, 0.0), margin=0.01)
    assert swapped.value < 0.5 + 0.2  # clean "pasted": nothing to find


def test_the_fixed_weights_stay_unless_a_candidate_is_better_by_the_margin() -> None:
    z, masks = _pseudo_maps("low")
    fixed = (0.45, 0.55, 0.0)
    criterion = pixel_criterion(z, masks)
    choice = choose_mix(criterion, fixed, margin=0.01)
    assert choice.mix != fixed and choice.learned
    kept = choose_mix(criterion, fixed, margin=choice.value - choice.fixed_value + 1e-6)
    assert kept.mix == fixed and not kept.learned and kept.value == kept.fixed_value
    same = {name: z["low"] for name in ("high", "joint", "low")}  # every candidate scores the same
    assert choose_mix(pixel_criterion(same, masks), fixed, margin=0.0).mix == fixed


def test_mix_maps_weights_high_joint_low_in_that_order() -> None:
    z = {"high": torch.full((1, 2, 2), 1.0), "joint": torch.full((1, 2, 2), 10.0), "low": torch.full((1, 2, 2), 100.0)}
    torch.testing.assert_close(mix_maps(z, (0.2, 0.3, 0.5)), torch.full((1, 2, 2), 0.2 + 3.0 + 50.0))


def test_training_learns_and_stores_the_weights_and_scoring_uses_them(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(10, 16, 8, 8, generator=gen) for _ in range(2)]
    cfg = replace(MODEL, fusion_pseudo_images=6)
    out = train(TensorSource(feats), None, cfg, TrainConfig(max_steps=3, batch_size=4, seed=0), tmp_path / "ck", device="cpu")
    record = json.loads((out / CONFIG_FILE).read_text())["result"]["fusion"]
    assert record["images"] == 6 and record["margin"] == cfg.fusion_margin
    # this run moves both weightings away from the fixed ones, so the checks below cannot hold by default
    for part in ("map", "score"):
        assert record[part]["learned"] and tuple(record[part]["mix"]) != cfg.fixed_mix
        assert record[part]["value"] > record[part]["fixed_value"] + cfg.fusion_margin
    assert record["map"]["mix"] != record["score"]["mix"]
    model, _ = load_checkpoint(out)
    assert model.mix == pytest.approx(tuple(record["map"]["mix"]))
    assert model.score_mix == pytest.approx(tuple(record["score"]["mix"]))
    with torch.no_grad():
        out_maps = model(feats)
        maps = model.branch_maps(out_maps)
        z = model.standardise(maps)
        grid = model.output_maps(out_maps)
    torch.testing.assert_close(grid.anomaly, mix_maps(z, model.mix))
    torch.testing.assert_close(grid.score, mix_maps(z, model.score_mix))
    final = finalize_maps(grid, ScoreConfig(resolution=32))
    from_score_map = finalize_maps(GridMaps(grid.score, None, None), ScoreConfig(resolution=32))
    torch.testing.assert_close(final.scores, from_score_map.scores)  # the image score is the score map's
    torch.testing.assert_close(final.anomaly, finalize_maps(GridMaps(grid.anomaly, None, None), ScoreConfig(resolution=32)).anomaly)


def test_the_same_weights_give_no_separate_score_map() -> None:
    model = build_model(MODEL, 16, 2, seed=0).eval()
    feats = [torch.randn(2, 16, 6, 6) for _ in range(2)]
    with torch.no_grad():
        grid = model.maps(feats)
    assert model.mix == model.score_mix and grid.score is None


def test_a_grid_without_room_around_a_paste_keeps_the_fixed_weights() -> None:
    model = build_model(MODEL, 16, 2, seed=0)
    choice = learn_fusion(model, TensorSource([torch.randn(4, 16, 1, 1)] * 2), batch_size=4,
                          device=torch.device("cpu"), seed=0)
    assert choice is not None and not choice.map.learned and "1 x 1 grid" in choice.note
    assert model.mix == MODEL.fixed_mix == model.score_mix


def test_fixed_weights_and_old_checkpoints_use_fusion_high_weight(tmp_path: Path) -> None:
    fixed = build_model(replace(MODEL, fusion_weights="fixed", fusion_high_weight=0.3), 16, 2, seed=0)
    assert not hasattr(fixed, "fusion_mix") and fixed.mix == (0.3, 0.7, 0.0)
    assert learn_fusion(fixed, TensorSource([torch.randn(4, 16, 6, 6)] * 2), batch_size=4,
                        device=torch.device("cpu"), seed=0) is None
    # A config written before learned weights existed has no buffer for them: it loads as "fixed".
    info = CheckpointInfo("harmoniad-checkpoint", 1, "test", replace(MODEL, fusion_weights="fixed"), None,
                          TrainConfig(), 16, 2, (6, 6))
    save_checkpoint(tmp_path / "old", fixed, info, {})
    config = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    del config["model"]["fusion_weights"]
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(config))
    loaded, loaded_info = load_checkpoint(tmp_path / "old")
    assert loaded_info.model.fusion_weights == "fixed" and loaded.mix == (0.45, 0.55, 0.0)


def test_one_branch_models_have_nothing_to_learn() -> None:
    model = build_model(replace(MODEL, branches="low"), 16, 2, seed=0)
    assert learn_fusion(model, TensorSource([torch.randn(4, 16, 6, 6)] * 2), batch_size=4,
                        device=torch.device("cpu"), seed=0) is None


class _PositionModel(torch.nn.Module):
    """A stand-in whose low map is exactly "this token was moved": channels 0 and 1 carry each
    token's own position, so a pasted token shows where it came from; high and joint are noise."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = MODEL
        self.register_buffer("fusion_mix", torch.tensor(MODEL.fixed_mix))
        self.register_buffer("fusion_score_mix", torch.tensor(MODEL.fixed_mix))
        self.noise = torch.Generator().manual_seed(0)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return feats

    def branch_maps(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        f = feats[0]
        b, _, h, w = f.shape
        rows = torch.arange(h, dtype=f.dtype).view(1, h, 1)
        cols = torch.arange(w, dtype=f.dtype).view(1, 1, w)
        moved = (f[:, 0] - rows) ** 2 + (f[:, 1] - cols) ** 2
        return {"high": torch.rand(b, h, w, generator=self.noise), "joint": torch.rand(b, h, w, generator=self.noise),
                "low": moved}

    def standardise(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return maps


def test_learning_reads_the_pasted_images_and_trusts_the_map_that_sees_the_pastes() -> None:
    h = w = 12
    pos = torch.stack(torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                     indexing="ij"))
    feats = [torch.cat([pos.expand(24, 2, h, w), torch.randn(24, 6, h, w)], dim=1)]
    model = _PositionModel()
    choice = learn_fusion(model, TensorSource(feats), batch_size=8, device=torch.device("cpu"), seed=0)  # type: ignore[arg-type]
    assert choice is not None and choice.images == 24
    # the low map finds the pastes (pixel AUROC + AUPRO near 2); read on unpasted maps it would be flat (0.65)
    assert choice.map.learned and choice.map.mix == (0.0, 0.0, 1.0) and choice.map.value > 1.8, choice
    assert choice.score.learned and choice.score.mix[2] >= 0.5 and choice.score.value > 0.95, choice
    torch.testing.assert_close(model.fusion_mix, torch.tensor(choice.map.mix))
    torch.testing.assert_close(model.fusion_score_mix, torch.tensor(choice.score.mix))


def test_the_description_names_the_weights_and_why() -> None:
    from harmoniad.train.fusion import WeightChoice, FusionChoice, describe_fusion

    fixed = (0.45, 0.55, 0.0)
    kept = WeightChoice(fixed, False, 1.0, 1.0)
    moved = WeightChoice((0.0, 0.2, 0.8), True, 1.4, 1.1)
    assert describe_fusion(fixed, fixed, None) == "anomaly map 0.45 high + 0.55 joint (fixed weights)"
    learned = FusionChoice(moved, kept, 12, 0.01).to_dict()
    assert describe_fusion((0.0, 0.2, 0.8), fixed, learned) == \
        "anomaly map 0.2 joint + 0.8 low; image score 0.45 high + 0.55 joint (learned on pseudo-defects)"
    none_better = FusionChoice(kept, kept, 12, 0.01).to_dict()
    assert describe_fusion(fixed, fixed, none_better).endswith("(fixed weights: pseudo-defects found none clearly better)")
