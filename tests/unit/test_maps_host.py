"""HostPrediction: per-batch maps land on the host in order; equal to collecting them all and converting at the end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmoniad.maps import FinalMaps, HostPrediction, prediction_from


def _batch(seed: int, n: int, branches: bool = True) -> FinalMaps:
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, 8, 8, generator=gen)
    return FinalMaps(scores=maps.amax(dim=(1, 2)), anomaly=maps,
                     high=maps * 0.5 if branches else None, low=maps * 0.25 if branches else None)


@pytest.mark.parametrize("total", [None, 7], ids=["gathered-at-the-end", "into-final-arrays"])
@pytest.mark.parametrize("branches", [True, False])
def test_batches_collected_on_the_host_equal_the_all_at_once_conversion(branches, total):
    parts = [_batch(i, n, branches) for i, n in enumerate([3, 3, 1])]
    host = HostPrediction(total)
    for p in parts:
        host.add(p)
    got, want = host.result(), prediction_from(parts)
    assert got.maps.shape == (7, 8, 8) and got.scores.dtype == np.float32
    for name in ("scores", "maps", "high_maps", "low_maps"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None) == (not branches and name in ("high_maps", "low_maps"))
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_an_empty_collection_is_refused():
    with pytest.raises(ValueError, match="no batches"):
        HostPrediction().result()


def test_an_announced_total_must_be_met_exactly():
    host = HostPrediction(4)
    host.add(_batch(0, 3))
    with pytest.raises(ValueError, match="3 of 4 images"):
        host.result()
    with pytest.raises(ValueError, match="more than the 4 images"):
        host.add(_batch(1, 2))
