"""The HarmoniAD network: each branch sees and reconstructs its own band, the losses and noise it trains
with, the fusion, and the shapes of the real ViT-L-14-336 backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmoniad.model import HarmoniAD, ModelConfig, parameter_counts, position_distance, token_noise
from harmoniad.model.fsam import FSAM, WindowAttention
from harmoniad.model.gscm import GSCM, LinearAttention
from harmoniad.runtime.serialization import ConfigError, from_dict, to_dict

SMALL = dict(hidden_dim=16, fsam_heads=2, gscm_heads=2, fsam_window=4, fsam_depth=1, gscm_depth=1)


def _feats(b: int = 2, c: int = 24, h: int = 6, w: int = 9, layers: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=gen) * (1.0 + i) + 2.0 * i for i in range(layers)]


def _numpy_bands(x: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Low and high band of ``B x C x h x w`` maps with numpy's FFT and a hard radial mask (see test_frequency)."""
    h, w = x.shape[-2:]
    radius = np.sqrt((2 * np.abs(np.fft.fftfreq(h)))[:, None] ** 2 + (2 * np.abs(np.fft.fftfreq(w)))[None, :] ** 2)
    mask = (radius < cutoff).astype(np.float64)
    spectrum = np.fft.fft2(x.astype(np.float64))
    return np.fft.ifft2(spectrum * mask).real, np.fft.ifft2(spectrum * (1 - mask)).real


def _fitted(cfg: ModelConfig, feats: list[torch.Tensor], in_dim: int = 24, layers: int = 3) -> HarmoniAD:
    model = HarmoniAD(cfg, in_dim, layers)
    model.fit_normalisation([feats])
    return model


def _normalised(feats: list[torch.Tensor]) -> list[np.ndarray]:
    """Per-layer, per-channel standardisation over batch and positions, computed independently."""
    out = []
    for f in feats:
        a = f.double().numpy()
        mean = a.mean(axis=(0, 2, 3), keepdims=True)
        std = a.std(axis=(0, 2, 3), keepdims=True)
        out.append((a - mean) / std)
    return out


@pytest.mark.parametrize("grid", [(8, 8), (6, 9), (3, 2), (1, 1)])
def test_fsam_keeps_token_shape_on_any_grid(grid: tuple[int, int]) -> None:
    fsam = FSAM(16, depth=2, heads=2, window=4)
    x = torch.randn(3, grid[0] * grid[1], 16)
    y = fsam(x, grid)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_window_attention_is_local_and_padding_is_masked() -> None:
    """A change in one window never reaches another window; padded positions are ignored."""
    attn = WindowAttention(8, heads=2, window=3).eval()
    grid = (5, 7)  # padded to 6 x 9
    x = torch.randn(1, 35, 8)
    y = attn(x, grid)
    x2 = x.clone()
    x2[0, 0] += 10.0 * torch.randn(8)  # position (0, 0), window (0, 0) covers rows 0-2, cols 0-2
    y2 = attn(x2, grid)
    changed = (y2 - y).abs().amax(dim=-1).reshape(5, 7) > 1e-6
    assert changed[:3, :3].any() and not changed[3:].any() and not changed[:, 3:].any()


def test_gscm_is_global_and_keeps_shape() -> None:
    gscm = GSCM(16, depth=1, heads=2, pos_conv=False).eval()
    x = torch.randn(2, 30, 16)
    y = gscm(x, (5, 6))
    assert y.shape == x.shape and y.dtype == torch.float32
    x2 = x.clone()
    x2[:, 0] += 5.0 * torch.randn(16)
    assert ((gscm(x2, (5, 6)) - y)[:, -1].abs() > 1e-6).any()  # the far corner sees the change


def test_linear_attention_matches_explicit_formula() -> None:
    attn = LinearAttention(8, heads=1)
    x = torch.randn(1, 10, 8)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = q @ k.transpose(1, 2)
    ref = attn.proj((weights / weights.sum(dim=-1, keepdim=True)) @ v)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_normalisation_is_fitted_on_training_features() -> None:
    feats = _feats()
    model = _fitted(ModelConfig(**SMALL), feats)
    for layer, ref in zip(model.normalised_tokens(feats), _normalised(feats)):
        np.testing.assert_allclose(layer.numpy(), ref.reshape(*ref.shape[:2], -1).transpose(0, 2, 1), atol=1e-4)
    raw = HarmoniAD(ModelConfig(**SMALL, normalize=False), 24, 3)
    raw.fit_normalisation([feats])
    torch.testing.assert_close(raw.normalised_tokens(feats)[2], feats[2].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="no training features"):
        model.fit_normalisation([])


@pytest.mark.parametrize("cutoff, fsam_input", [(0.25, "high"), (0.5, "high"), (0.9, "high"), (0.5, "whole")])
def test_fsam_gets_the_high_band_and_gscm_the_low_band(cutoff: float, fsam_input: str) -> None:
    """What each branch receives and rebuilds, against bands computed independently (numpy FFT of the
    normalised features): GSCM reads the low band, FSAM the high band or (``fsam_input="whole"``) the
    whole feature; the targets are the two bands either way."""
    feats = _feats(h=8, w=8)
    model = _fitted(ModelConfig(**SMALL, cutoff=cutoff, fsam_input=fsam_input), feats).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        model.fsam_branch.register_forward_pre_hook(lambda m, args: seen.__setitem__("fsam", args[0])),
        model.gscm_branch.register_forward_pre_hook(lambda m, args: seen.__setitem__("gscm", args[0])),
    ]
    with torch.no_grad():
        out = model(feats)
    for h in hooks:
        h.remove()
    for layer, norm in enumerate(_normalised(feats)):
        low, high = _numpy_bands(norm, cutoff)
        as_tokens = lambda a: a.reshape(*a.shape[:2], -1).transpose(0, 2, 1)  # noqa: E731
        fsam_reads = high if fsam_input == "high" else norm
        np.testing.assert_allclose(seen["fsam"][layer].numpy(), as_tokens(fsam_reads), atol=1e-4)
        np.testing.assert_allclose(seen["gscm"][layer].numpy(), as_tokens(low), atol=1e-4)
        np.testing.assert_allclose(out.target_high[layer].numpy(), as_tokens(high), atol=1e-4)
        np.testing.assert_allclose(out.target_low[layer].numpy(), as_tokens(low), atol=1e-4)
        assert np.abs(high).mean() > 0.1 and np.abs(low).mean() > 0.01  # both bands carry signal here


@pytest.mark.parametrize("branch, changed, unchanged", [("fsam", "high", "low"), ("gscm", "low", "high")])
def test_each_band_reconstruction_and_map_comes_from_its_own_branch(branch: str, changed: str, unchanged: str) -> None:
    """Perturbing FSAM moves only the high reconstruction and map; perturbing GSCM only the low ones."""
    feats = _feats()
    model = _fitted(ModelConfig(**SMALL), feats).eval()
    with torch.no_grad():
        before, maps_before = model(feats), model.maps(feats)
        for param in getattr(model, branch).parameters():
            param.add_(0.5 * torch.randn_like(param))
        after, maps_after = model(feats), model.maps(feats)
    assert not torch.allclose(getattr(before, f"recon_{changed}")[0], getattr(after, f"recon_{changed}")[0])
    assert torch.equal(getattr(before, f"recon_{unchanged}")[0], getattr(after, f"recon_{unchanged}")[0])
    assert not torch.allclose(getattr(maps_before, changed), getattr(maps_after, changed))
    assert torch.equal(getattr(maps_before, unchanged), getattr(maps_after, unchanged))


def test_branch_maps_are_the_distance_of_each_branch_to_its_band() -> None:
    feats = _feats()
    model = _fitted(ModelConfig(**SMALL), feats).eval()
    with torch.no_grad():
        out = model(feats)
        maps = model.output_maps(out)
    for band in ("high", "low"):
        recon = [r.double().numpy() for r in getattr(out, f"recon_{band}")]
        target = [t.double().numpy() for t in getattr(out, f"target_{band}")]
        ref = np.mean([((r - t) ** 2).mean(axis=-1) for r, t in zip(recon, target)], axis=0).reshape(2, 6, 9)
        np.testing.assert_allclose(getattr(maps, band).numpy(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("w_high, w_low, w_joint",
                         [(1.0, 1.0, 0.0), (0.3, 2.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.3, 2.0, 0.5),
                          (0.0, 0.0, 1.0)])
def test_loss_is_the_weighted_sum_of_the_band_terms_and_the_joint_term(w_high: float, w_low: float,
                                                                      w_joint: float) -> None:
    """Each band term is its branch against its band, the joint term their sum against the
    whole feature; a branch gets a gradient exactly when a term it enters has weight > 0."""
    feats = _feats()
    # Every position (hard-point mining has its own test), so each term is the plain mean written out below.
    cfg = ModelConfig(**SMALL, high_loss_weight=w_high, low_loss_weight=w_low, joint_loss_weight=w_joint,
                      hard_mining_fraction=1.0)
    model = _fitted(cfg, feats).train()
    out = model(feats, generator=torch.Generator().manual_seed(0))
    losses = model.loss(out)

    def mse(recons: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
        return float(np.mean([((r.detach().double() - t.double()) ** 2).mean().item() for r, t in zip(recons, targets)]))

    high = mse(out.recon_high, out.target_high)
    low = mse(out.recon_low, out.target_low)
    # Against the normalised feature itself, not the two bands added back: the split's halves sum to it.
    joint = mse([rh.detach().double() + rl.detach().double() for rh, rl in zip(out.recon_high, out.recon_low)],
                out.target)
    assert losses.high == pytest.approx(high, rel=1e-4)
    assert losses.low == pytest.approx(low, rel=1e-4)
    assert (losses.joint is None) == (w_joint == 0)
    if w_joint:
        assert losses.joint == pytest.approx(joint, rel=1e-4)
    assert float(losses.total.detach()) == pytest.approx(w_high * high + w_low * low + w_joint * joint, rel=1e-4)
    losses.total.backward()
    for branch, weight in (("fsam", w_high), ("gscm", w_low)):
        grads = [p.grad for p in getattr(model, branch).parameters()]
        moved = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert moved == (weight > 0 or w_joint > 0), branch


def test_training_noise_drops_whole_tokens_and_adds_feature_noise() -> None:
    """What FSAM with token queries projects in training: about ``token_dropout`` of the tokens zeroed, the
    rest noisy by ``feature_noise`` (position queries never read their own token and get no noise)."""
    feats = _feats(b=8, h=12, w=12)
    cfg = ModelConfig(**SMALL, fsam_queries="tokens", token_dropout=0.3, feature_noise=0.5, bottleneck_dropout=0.0)
    model = _fitted(cfg, feats)
    seen: dict[str, torch.Tensor] = {}
    hook = model.fsam_branch.inputs[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        band = model.eval()(feats).target_high[0]
        model.eval()(feats)
        torch.testing.assert_close(seen["x"], band)  # no noise when scoring
        model.train()(feats, generator=torch.Generator().manual_seed(3))
    hook.remove()
    x = seen["x"]
    dropped = (x == 0).all(dim=-1)
    assert 0.22 < float(dropped.float().mean()) < 0.38
    noise = (x - band)[~dropped]
    assert float(noise.std()) == pytest.approx(0.5, rel=0.1)
    clean = token_noise(band, 0.5, 0.3, training=False)
    assert clean is band


def test_position_distances_match_their_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    r, t = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen)
    torch.testing.assert_close(position_distance(r, t, "mse"), ((r - t) ** 2).mean(-1))
    groups = [1 - torch.nn.functional.cosine_similarity(r[..., i:i + 3], t[..., i:i + 3], dim=-1) for i in (0, 3, 6, 9)]
    torch.testing.assert_close(position_distance(r, t, "group_cos", groups=4), torch.stack(groups).mean(0))
    scaled = r.clone()
    scaled[..., :3] *= 100.0  # one group 100x larger changes nothing of a per-group cosine
    torch.testing.assert_close(position_distance(scaled, t, "group_cos", groups=4), torch.stack(groups).mean(0))


def test_hard_mining_averages_only_the_hardest_positions() -> None:
    feats = _feats()
    mined = _fitted(ModelConfig(**SMALL, hard_mining_fraction=0.1), feats).eval()
    plain = _fitted(ModelConfig(**SMALL, hard_mining_fraction=1.0), feats).eval()
    plain.load_state_dict(mined.state_dict())
    with torch.no_grad():
        out = mined(feats)
        dist = torch.stack([position_distance(r, t) for r, t in zip(out.recon_low, out.target_low)])
        expected = float(np.mean([d.flatten().topk(11).values.mean().item() for d in dist]))
        assert mined.loss(out).low == pytest.approx(expected, rel=1e-5)
        assert mined.loss(out).low > plain.loss(out).low


@pytest.mark.parametrize("fusion", ["joint", "mean", "max"])
def test_fusion_standardises_each_map_on_normal_data(fusion: str) -> None:
    """Location and scale of every map come from normal data (median, 0.9-quantile); the anomaly map is
    the documented combination of the standardised maps; the joint map is ``1 - cos(R_high + R_low, X)``."""
    feats, other = _feats(b=4), _feats(b=2, seed=5)
    cfg = ModelConfig(**SMALL, fusion=fusion, fusion_high_weight=0.7, fusion_quantile=0.9)
    model = _fitted(cfg, feats).eval()
    with torch.no_grad():
        raw = model.branch_maps(model(feats))
        model.calibrate([[f[:2] for f in feats], [f[2:] for f in feats]])  # batch by batch
        for i, name in enumerate(("high", "low", "joint")):
            values = raw[name].flatten()
            assert float(model.map_mean[i]) == pytest.approx(float(values.median()), rel=1e-5)
            scale = float(torch.quantile(values, 0.9) - values.median())
            assert float(model.map_std[i]) == pytest.approx(scale, rel=1e-5)
        out = model(other)
        maps = model.output_maps(out)
        joint = np.mean([
            1 - ((rh + rl) * x).sum(-1) / (np.linalg.norm(rh + rl, axis=-1) * np.linalg.norm(x, axis=-1))
            for rh, rl, x in zip(*([t.double().numpy() for t in ts] for ts in (out.recon_high, out.recon_low, out.target)))
        ], axis=0).reshape(2, 6, 9)
        np.testing.assert_allclose(model.branch_maps(out)["joint"].numpy(), joint, rtol=1e-4, atol=1e-6)
        z = {name: (m - model.map_mean[i]) / model.map_std[i]
             for i, (name, m) in enumerate((("high", maps.high), ("low", maps.low), ("joint", torch.from_numpy(joint).float())))}
        expected = {"joint": 0.7 * z["high"] + 0.3 * z["joint"], "mean": 0.7 * z["high"] + 0.3 * z["low"],
                    "max": torch.maximum(z["high"], z["low"])}[fusion]
        torch.testing.assert_close(maps.anomaly, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("location", ["references", "image"])
def test_reference_fusion_statistics_come_from_the_training_normals(location: str) -> None:
    """``calibrate`` keeps, per training image (an evenly strided subset beyond ``fusion_references``), the
    log median of each map and its own 0.9-quantile minus median, computed here from the raw maps; an image
    is then standardised by the mean scale of its nearest references, around their mean median (or its own)."""
    feats, other = _feats(b=6), _feats(b=2, seed=5)
    cfg = ModelConfig(**SMALL, fusion_quantile=0.9, fusion_references=4, fusion_neighbours=2,
                      fusion_location=location)
    model = _fitted(cfg, feats).eval()
    with torch.no_grad():
        raw = {k: v.flatten(1).double().numpy() for k, v in model.branch_maps(model(feats)).items()}
        model.calibrate([[f[:4] for f in feats], [f[4:] for f in feats]])  # batch by batch
        kept = [0, 2, 3, 5]  # 4 of 6 images, evenly strided
        assert int(model.ref_count) == 4
        for i, name in enumerate(("high", "low", "joint")):
            med = np.median(raw[name][kept], axis=1)
            # float32 log of a median near 1 is near 0: compare it with an absolute tolerance too
            np.testing.assert_allclose(model.ref_desc[:4, i].numpy(), np.log(med), rtol=1e-5, atol=1e-6)
            scale = np.quantile(raw[name][kept], 0.9, axis=1) - med
            np.testing.assert_allclose(model.ref_scale[:4, i].numpy(), scale, rtol=1e-4)
        maps = model.branch_maps(model(other))
        test = {k: v.flatten(1).double().numpy() for k, v in maps.items()}
        own = np.stack([np.median(test[k], axis=1) for k in ("high", "low", "joint")], axis=1)
        refs = np.stack([np.log(np.median(raw[k][kept], axis=1)) for k in ("high", "low", "joint")], axis=1)
        scales = np.stack([np.quantile(raw[k][kept], 0.9, axis=1) - np.median(raw[k][kept], axis=1)
                           for k in ("high", "low", "joint")], axis=1)
        nearest = np.argsort(((np.log(own)[:, None] - refs[None]) ** 2).sum(-1), axis=1)[:, :2]
        scale = scales[nearest].mean(axis=1)  # (2 images, 3 maps)
        loc = own if location == "image" else np.exp(refs)[nearest].mean(axis=1)
        z = {k: (test[k] - loc[:, i:i + 1]) / scale[:, i:i + 1] for i, k in enumerate(("high", "low", "joint"))}
        expected = (0.45 * z["high"] + 0.55 * z["joint"]).reshape(2, 6, 9)
        np.testing.assert_allclose(model.fuse(maps).double().numpy(), expected, rtol=1e-4, atol=1e-4)


def _with_references(cfg: ModelConfig, medians: list[tuple[float, float, float]],
                     scales: list[tuple[float, float, float]]) -> HarmoniAD:
    model = HarmoniAD(cfg, 24, 3)
    model.ref_desc[: len(medians)] = torch.tensor(medians).log()
    model.ref_scale[: len(scales)] = torch.tensor(scales)
    model.ref_count.fill_(len(medians))
    return model


def test_reference_fusion_follows_each_branch_where_only_it_fires() -> None:
    """Two kinds of normal image (a texture-like one with a narrow high map, an object-like one with a wide
    one): in an image of either kind, a peak of two of its kind's scales in the high map alone, or in the
    joint map alone, shows in the anomaly map at exactly w * 2 or (1 - w) * 2, and nowhere else. A pooled
    scale would weigh the texture's high peak by the object's width and the other way round."""
    kinds = {"texture": ((0.3, 0.1, 0.2), (0.2, 0.3, 0.1)), "object": ((0.1, 0.08, 0.15), (0.8, 0.3, 0.5))}
    medians = [kinds[k][0] for k in kinds for _ in range(5)]
    scales = [kinds[k][1] for k in kinds for _ in range(5)]
    model = _with_references(ModelConfig(**SMALL, fusion_neighbours=5, fusion_high_weight=0.45), medians, scales)
    for med, scale in kinds.values():
        maps = {name: torch.full((1, 4, 4), med[i]) for i, name in enumerate(("high", "low", "joint"))}
        maps["high"][0, 0, 1] += 2 * scale[0]  # only the high map fires here
        maps["joint"][0, 2, 3] += 2 * scale[2]  # only the joint map fires here
        maps["low"][0, 3, 0] += 2 * scale[1]  # the low map enters through the joint map only
        expected = torch.zeros(1, 4, 4)
        expected[0, 0, 1], expected[0, 2, 3] = 0.45 * 2, 0.55 * 2
        torch.testing.assert_close(model.fuse(maps), expected, rtol=1e-5, atol=1e-5)


def test_reference_fusion_with_one_branch_standardises_that_branch() -> None:
    cfg = ModelConfig(**SMALL, branches="low", fusion_neighbours=1)
    model = _with_references(cfg, [(1.0, 0.5, 1.0), (1.0, 0.05, 1.0)], [(1.0, 0.2, 1.0), (1.0, 0.02, 1.0)])
    low = torch.full((1, 3, 3), 0.05)
    low[0, 1, 1] = 0.09
    expected = torch.zeros(1, 3, 3)
    expected[0, 1, 1] = 2.0  # the nearer reference (median 0.05) sets the scale 0.02
    torch.testing.assert_close(model.fuse({"low": low}), expected)


@pytest.mark.parametrize(
    "flags, has_high, has_low",
    [({}, True, True), ({"split": False}, True, True), ({"branches": "high"}, True, False),
     ({"branches": "low"}, False, True), ({"split": False, "branches": "low"}, False, True),
     ({"soft_edge": 0.3, "learnable_cutoff": True}, True, True), ({"distance": "group_cos"}, True, True),
     ({"pos_embed": True}, True, True)],
)
def test_ablation_switches(flags: dict, has_high: bool, has_low: bool) -> None:
    feats = _feats()
    model = _fitted(ModelConfig(**SMALL, **flags), feats)
    out = model(feats)
    assert out.grid == (6, 9) and len(out.target) == 3
    assert (out.recon_high is not None) == has_high and (out.recon_low is not None) == has_low
    for recon in (out.recon_high, out.recon_low):
        assert recon is None or all(r.shape == (2, 54, 24) and r.dtype == torch.float32 for r in recon)
    if not flags.get("split", True):  # no split: both branches reconstruct the whole normalised features
        for band in ("high", "low"):
            if getattr(out, f"target_{band}") is not None:
                assert getattr(out, f"target_{band}")[0] is out.target[0]
    losses = model.loss(out)
    assert (losses.high is not None) == has_high and (losses.low is not None) == has_low
    losses.total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        maps = model.eval().maps(feats)
    assert maps.anomaly.shape == (2, 6, 9) and maps.anomaly.dtype == torch.float32
    assert (maps.high is not None) == has_high and (maps.low is not None) == has_low
    if not (has_high and has_low):  # one branch: the anomaly map is its standardised map
        only = maps.high if has_high else maps.low
        torch.testing.assert_close(maps.anomaly, (only - model.map_mean[0 if has_high else 1]) / model.map_std[0 if has_high else 1])


def test_branch_modules_exist_only_when_used() -> None:
    both = parameter_counts(HarmoniAD(ModelConfig(**SMALL), 24, 3))
    high = parameter_counts(HarmoniAD(ModelConfig(**SMALL, branches="high"), 24, 3))
    low = parameter_counts(HarmoniAD(ModelConfig(**SMALL, branches="low"), 24, 3))
    assert high["gscm"] == 0 and low["fsam"] == 0 and both["fsam"] > 0 and both["gscm"] > 0
    assert both["total"] == high["total"] + low["total"]


@pytest.mark.parametrize("fsam_queries", ["tokens", "positions"])
def test_eval_is_deterministic_and_noise_only_in_training(fsam_queries: str) -> None:
    """Scoring is deterministic; training noise is seeded by the generator and reaches FSAM only when it
    reads its own token (``fsam_queries="tokens"``): position queries have no copy path for noise to break."""
    feats = _feats()
    model = _fitted(ModelConfig(**SMALL, fsam_queries=fsam_queries, bottleneck_dropout=0.2), feats)
    model.eval()
    a, b = model.maps(feats).anomaly, model.maps(feats).anomaly
    assert torch.equal(a, b)
    model.train()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model(feats, generator=g1).recon_high[0], model(feats, generator=g2).recon_high[0])
    noisy = model(feats, generator=torch.Generator().manual_seed(2)).recon_high[0]
    clean = model.eval()(feats).recon_high[0]
    if fsam_queries == "tokens":
        assert not torch.equal(noisy, clean)
    else:
        torch.testing.assert_close(noisy, clean)


def test_wrong_inputs_are_refused_with_the_expected_shape() -> None:
    model = HarmoniAD(ModelConfig(**SMALL), 24, 3)
    with pytest.raises(ValueError, match="3 layers"):
        model(_feats(layers=2))
    with pytest.raises(ValueError, match="B x 24 x"):
        model(_feats(c=16))


def test_config_round_trip_and_validation() -> None:
    cfg = ModelConfig(**SMALL, branches="low", split=False, distance="group_cos", fusion="mean")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError):
        from_dict(ModelConfig, {**to_dict(cfg), "branches": "middle"})
    with pytest.raises(ConfigError, match="high_source"):
        from_dict(ModelConfig, {**to_dict(cfg), "high_source": "split"})  # a removed option is refused by name
    for bad, match in [({"distance": "l1"}, "distance"), ({"fusion": "sum"}, "fusion"),
                       ({"token_dropout": 1.0}, "token_dropout"), ({"feature_noise": -0.1}, "feature_noise"),
                       ({"fusion_quantile": 1.0}, "fusion_quantile"), ({"fusion_high_weight": 1.5}, "fusion_high_weight"),
                       ({"learnable_cutoff": True}, "learnable_cutoff"), ({"hard_mining_fraction": 0.0}, "hard_mining"),
                       ({"joint_loss_weight": -1.0}, "joint -1.0")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**bad)  # type: ignore[arg-type]


def test_model_on_tiny_backbone_features() -> None:
    from harmoniad.backbone import TINY_BACKBONE, Backbone

    backbone = Backbone(TINY_BACKBONE, device="cpu")
    images = [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(2)]
    feats = backbone.extract(backbone.preprocess(images))
    model = HarmoniAD(ModelConfig(**SMALL), backbone.embed_dim, backbone.num_layers).eval()
    with torch.inference_mode():
        maps = model.maps(feats)
    assert maps.anomaly.shape == (2, *backbone.grid) and maps.high is not None and maps.low is not None
