"""harmoniad.stats against slow, independent computations: a per-resample loop over the exact
metrics of harmoniad.metrics (bootstrap), the O(n^2) placement matrix (DeLong), Demsar's
table (Nemenyi) and the textbook rank formula (Friedman)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats as sps
from sklearn.metrics import roc_auc_score

from harmoniad import metrics, stats


def image_case(seed: int, n: int = 80, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    scores = rng.normal(size=n) + 1.2 * labels
    return labels, (np.round(scores * 2) / 2 if ties else scores)


def pixel_case(seed: int, n: int = 14, size: int = 24, levels: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks on 2/3 of the images (the rest normal), smooth maps higher on the blobs."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.5, 1.5))
    masks = smooth > np.quantile(smooth, 0.9, axis=(1, 2), keepdims=True)
    masks[: n // 3] = False
    maps = ndimage.gaussian_filter(rng.normal(size=masks.shape), (0, 1, 1)) + 0.6 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


# ----------------------------------------------------------------------------- resampling


def test_resample_counts_keep_each_stratum_size_and_are_seeded():
    strata = np.array([0, 1, 1, 0, 0, 1, 0])
    counts = stats.resample_counts(strata, 500, seed=3)
    assert counts.shape == (500, 7)
    np.testing.assert_array_equal(counts[:, strata == 0].sum(axis=1), 4)
    np.testing.assert_array_equal(counts[:, strata == 1].sum(axis=1), 3)
    np.testing.assert_array_equal(counts, stats.resample_counts(strata, 500, seed=3))
    assert not np.array_equal(counts, stats.resample_counts(strata, 500, seed=4))
    # each item is drawn once per resample on average
    np.testing.assert_allclose(counts.mean(axis=0), 1.0, atol=0.15)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True)])
def test_image_auroc_resamples_equal_a_slow_loop(seed, ties, monkeypatch):
    labels, scores = image_case(seed, ties=ties)
    monkeypatch.setattr(stats, "_BLOCK_ENTRIES", 37 * len(labels))  # several blocks
    got = stats.image_auroc_resamples(labels, scores, 120, seed=seed)
    counts = stats.resample_counts(labels.astype(np.int8), 120, seed=seed)
    assert got.shape == (120,)
    for b in range(120):
        idx = np.repeat(np.arange(len(labels)), counts[b])
        want = metrics.image_metrics(labels[idx], scores[idx])["auroc"]
        assert got[b] == pytest.approx(want, abs=1e-12)
    idx = np.repeat(np.arange(len(labels)), counts[7])
    assert got[7] == pytest.approx(roc_auc_score(labels[idx], scores[idx]), abs=1e-12)
    assert np.ptp(got) > 0.05  # the resamples differ


def test_interval_is_the_percentile_interval_and_mean_combines_resamples():
    labels, scores = image_case(2, n=200)
    samples = stats.image_auroc_resamples(labels, scores, 1000, seed=0)
    exact = metrics.image_metrics(labels, scores)["auroc"]
    ci = stats.interval(samples, exact)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(samples, [0.025, 0.975])))
    assert ci.low < exact < ci.high and ci.high - ci.low < 0.2
    assert ci.n_resamples == 1000 and ci.as_list() == [ci.low, ci.high]
    other = stats.image_auroc_resamples(*image_case(3, n=200), 1000, seed=1)
    mean = stats.mean_interval([samples, other], [exact, 0.8])
    assert mean.estimate == pytest.approx((exact + 0.8) / 2)
    assert mean.low == pytest.approx(np.quantile((samples + other) / 2, 0.025))
    with pytest.raises(ValueError, match="same number of resamples"):
        stats.mean_interval([samples, other[:10]], [0.5, 0.5])


def test_interval_coverage_on_a_known_population():
    """About 95% of seeded 95% intervals cover the population AUROC (binormal, d=1)."""
    truth = sps.norm.cdf(1 / np.sqrt(2))
    covered = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        labels = np.r_[np.zeros(150, bool), np.ones(100, bool)]
        scores = rng.normal(size=250) + labels
        ci = stats.interval(stats.image_auroc_resamples(labels, scores, 400, seed=seed), 0.0)
        covered += ci.low <= truth <= ci.high
    assert 50 <= covered <= 60


# ----------------------------------------------------------------------------- pixel metrics


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 4)])
def test_pixel_resamples_equal_a_slow_loop_on_the_same_bins(seed, levels, monkeypatch):
    """Each resample's binned metrics are the exact metrics of the resampled images with every
    score replaced by its bin index (ties within a bin counted half, curves through the bins)."""
    masks, maps = pixel_case(seed, levels=levels)
    hist = stats.pixel_histograms(masks, maps, bins=64)
    monkeypatch.setattr(stats, "_BLOCK_ENTRIES", 7 * len(masks))  # several blocks
    got = stats.pixel_resamples(hist, 25, seed=seed)
    counts = stats.resample_counts(hist.defective.astype(np.int8), 25, seed=seed)
    binned = hist.bin_of(maps)
    assert len(np.unique(binned)) > (30 if levels is None else 4)
    for b in range(25):
        idx = np.repeat(np.arange(len(masks)), counts[b])
        want = metrics.pixel_metrics(masks[idx], binned[idx])
        assert got.auroc[b] == pytest.approx(want["auroc"], abs=1e-10)
        assert got.aupro[b] == pytest.approx(want["aupro"], abs=1e-10)
    assert np.ptp(got.aupro) > 0.01


@pytest.mark.parametrize("seed,levels,bins,tolerance", [
    (0, None, 1024, 2e-3), (2, None, 1024, 2e-3), (3, 8, 1024, 0.15), (4, None, 16, 0.2)])
def test_binned_metrics_are_within_their_bound_of_the_exact_metrics(seed, levels, bins, tolerance):
    """The stated bound holds on the full set and on resamples; with the default 1,024 bins
    on continuous maps it is below 2e-3 here. It counts tied pairs as possible error, so on
    coarsely quantized maps (8 levels) it is loose while the error itself stays small; with
    16 bins it is loose and still holds."""
    masks, maps = pixel_case(seed, n=18, size=32, levels=levels)
    hist = stats.pixel_histograms(masks, maps, bins=bins)
    full = stats.binned_pixel_metrics(hist)
    exact = metrics.pixel_metrics(masks, maps)
    assert abs(full.auroc[0] - exact["auroc"]) <= full.auroc_bound[0] + 1e-12
    assert abs(full.aupro[0] - exact["aupro"]) <= full.aupro_bound[0] + 1e-12
    assert full.auroc_bound[0] < tolerance and full.aupro_bound[0] < tolerance
    res = stats.pixel_resamples(hist, 6, seed=seed)
    counts = stats.resample_counts(hist.defective.astype(np.int8), 6, seed=seed)
    for b in range(6):
        idx = np.repeat(np.arange(len(masks)), counts[b])
        want = metrics.pixel_metrics(masks[idx], maps[idx])
        assert abs(res.auroc[b] - want["auroc"]) <= res.auroc_bound[b] + 1e-12
        assert abs(res.aupro[b] - want["aupro"]) <= res.aupro_bound[b] + 1e-12
    assert max(res.max_error.values()) < tolerance
    if bins == 1024:
        assert abs(full.auroc[0] - exact["auroc"]) < 2e-3
        assert abs(full.aupro[0] - exact["aupro"]) < 2e-3


def test_bins_are_monotone_in_the_score():
    masks, maps = pixel_case(5)
    hist = stats.pixel_histograms(masks, maps, bins=128)
    values = np.sort(maps.ravel())
    assert np.all(np.diff(hist.bin_of(values)) >= 0)
    assert hist.bins <= 128 and hist.neg.sum() == np.count_nonzero(~masks)
    assert hist.pos.sum() == np.count_nonzero(masks)
    assert hist.regions.sum() == sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)


def test_pixel_histograms_refuse_one_class():
    masks, maps = pixel_case(6)
    with pytest.raises(metrics.MetricError, match="one class"):
        stats.pixel_histograms(np.zeros_like(masks), maps)
    broken = maps.copy()
    broken[3, 2, 2] = np.nan
    with pytest.raises(metrics.MetricError, match="NaN"):
        stats.pixel_histograms(masks, broken)


# ----------------------------------------------------------------------------- paired tests


def direct_delong(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong's z and p from the full placement matrices psi(x_i, y_j), O(n^2)."""
    comps = []
    for s in (a, b):
        pos, neg = s[labels][:, None], s[~labels][None, :]
        psi = (pos > neg) + 0.5 * (pos == neg)
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = labels.sum(), (~labels).sum()

    def cov(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.sum((u - u.mean()) * (v - v.mean())) / (len(u) - 1))

    var = 0.0
    for (i, j, sign) in ((0, 0, 1), (1, 1, 1), (0, 1, -2)):
        var += sign * (cov(comps[i][1], comps[j][1]) / m + cov(comps[i][2], comps[j][2]) / n)
    z = (comps[0][0] - comps[1][0]) / np.sqrt(var)
    return float(z), float(2 * (1 - sps.norm.cdf(abs(z))))


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_delong_matches_the_direct_computation(seed, ties):
    labels, a = image_case(seed, n=120, ties=ties)
    rng = np.random.default_rng(seed + 10)
    b = 0.7 * a + rng.normal(size=len(a))  # correlated with a, weaker
    if ties:
        b = np.round(b)
    got = stats.delong_test(labels, a, b)
    z, p = direct_delong(labels, a, b)
    assert got.auroc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert got.auroc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    assert got.z == pytest.approx(z, rel=1e-9)
    assert got.p_value == pytest.approx(p, rel=1e-6, abs=1e-12)
    assert got.difference == pytest.approx(got.auroc_a - got.auroc_b)


def test_delong_identical_and_clearly_different_methods():
    labels, a = image_case(4, n=300)
    same = stats.delong_test(labels, a, a)
    assert same.p_value == 1.0 and same.z == 0.0
    noise = np.random.default_rng(0).normal(size=len(a))
    different = stats.delong_test(labels, a, noise)
    assert different.p_value < 1e-6 and different.z > 0


def test_paired_pixel_bootstrap():
    masks, maps = pixel_case(7, n=20)
    noisy = maps + np.random.default_rng(1).normal(scale=1.5, size=maps.shape).astype(np.float32)
    ha = stats.pixel_histograms(masks, maps, bins=256)
    hb = stats.pixel_histograms(masks, noisy, bins=256)
    same = stats.paired_pixel_bootstrap(ha, ha, 200, seed=0)
    assert same["pixel_auroc"].difference == 0.0 and same["aupro"].p_value == 1.0
    assert same["aupro"].low == same["aupro"].high == 0.0
    got = stats.paired_pixel_bootstrap(ha, hb, 200, seed=0)
    # every resample draws the same images for both methods: the differences are those of
    # the unpaired resamples with the same seed
    ra, rb = stats.pixel_resamples(ha, 200, seed=0), stats.pixel_resamples(hb, 200, seed=0)
    d = ra.aupro - rb.aupro
    assert got["aupro"].low == pytest.approx(np.quantile(d, 0.025))
    assert got["aupro"].difference > 0.1 and got["aupro"].low > 0
    assert got["aupro"].p_value == pytest.approx(2 / 201)
    assert got["pixel_auroc"].max_error == pytest.approx(ra.auroc_bound.max() + rb.auroc_bound.max(),
                                                         rel=0.5)
    with pytest.raises(ValueError, match="same images"):
        stats.paired_pixel_bootstrap(ha, stats.pixel_histograms(masks[:-1], maps[:-1]), 10)


# ----------------------------------------------------------------------------- across runs


def test_mean_sd_over_seeds():
    assert stats.mean_sd([0.9, 0.92, 0.94]) == pytest.approx((0.92, 0.02, 3))
    assert stats.mean_sd([0.9, float("nan"), None]) == (0.9, None, 1)
    with pytest.raises(ValueError, match="no finite"):
        stats.mean_sd([float("nan")])


@pytest.mark.parametrize("k,q", [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850),
                                 (7, 2.949), (8, 3.031), (9, 3.102), (10, 3.164)])
def test_nemenyi_cd_matches_demsar_table(k, q):
    n = 14
    assert stats.nemenyi_cd(k, n) == pytest.approx(q * np.sqrt(k * (k + 1) / (6 * n)), abs=2e-3)


def test_friedman_matches_the_rank_formula_and_groups_methods():
    rng = np.random.default_rng(0)
    n, k = 15, 4
    scores = rng.random((n, k)) * 0.1 + np.array([0.9, 0.85, 0.7, 0.69])
    scores[3, 0] = np.nan  # a dataset without every method is left out
    got = stats.friedman_nemenyi(scores)
    kept = scores[np.isfinite(scores).all(axis=1)]
    ranks = np.argsort(np.argsort(-kept, axis=1), axis=1) + 1  # no ties in random data
    r = ranks.mean(axis=0)
    nk = len(kept)
    chi2 = 12 * nk / (k * (k + 1)) * (np.sum(r ** 2) - k * (k + 1) ** 2 / 4)
    assert got.n_datasets == nk == 14
    np.testing.assert_allclose(got.average_ranks, r)
    assert got.statistic == pytest.approx(chi2)
    assert got.p_value == pytest.approx(sps.chi2.sf(chi2, k - 1))
    assert got.critical_difference == pytest.approx(stats.nemenyi_cd(k, nk))
    for clique in got.cliques:
        assert np.ptp(r[list(clique)]) <= got.critical_difference
    # methods 2 and 3 (close scores) share a clique, 0 and 3 (far apart) do not
    assert any({2, 3} <= set(c) for c in got.cliques)
    assert not any({0, 3} <= set(c) for c in got.cliques)


def test_cd_cliques_are_maximal():
    ranks = np.array([1.0, 1.5, 2.4, 3.5, 4.0])
    assert stats.cd_cliques(ranks, 1.0) == [(0, 1), (1, 2), (3, 4)]
    assert stats.cd_cliques(ranks[::-1].copy(), 1.0) == [(4, 3), (3, 2), (1, 0)]
    assert stats.cd_cliques(ranks, 0.1) == []
    assert stats.cd_cliques(ranks, 10.0) == [(0, 1, 2, 3, 4)]
