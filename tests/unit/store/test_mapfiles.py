"""Map files: float16 maps come back exactly as float16, damaged blobs are named, format-1 (zlib) files still read."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from harmoniad.store import RunDataMissing
from harmoniad.store.mapfiles import read_maps, write_maps

R = 24


def _maps(n: int = 4) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:R, 0:R] / R
    smooth = np.stack([np.sin(6 * xx * (i + 1)) + yy for i in range(n)]).astype(np.float32)
    masks = rng.random((n, R, R)) < 0.1
    return {"anomaly": smooth * 3.0, "high": smooth * 1e-5, "low": rng.random((n, R, R)).astype(np.float32) * 7e4}, masks


def _float16_exact(values: np.ndarray) -> np.ndarray:
    """What float16 with a per-map power-of-two scale keeps: the reference, computed per map with numpy."""
    out = np.empty_like(values)
    for i, m in enumerate(values):
        e = -int(np.floor(np.log2(np.abs(m).max())))
        out[i] = np.ldexp(np.ldexp(m, e).astype(np.float16).astype(np.float32), -e)
    return out


def test_float16_maps_round_trip_to_their_float16_values(tmp_path: Path) -> None:
    maps, masks = _maps()
    path = tmp_path / "a.maps"
    write_maps(path, 4, R, maps, masks, "float16")
    for i in range(4):
        got = read_maps(path, i, "test")
        np.testing.assert_array_equal(got["mask"], masks[i])
        for name, stack in maps.items():
            np.testing.assert_array_equal(got[name], _float16_exact(stack)[i])


def test_non_finite_values_come_back_as_they_are_and_the_scale_follows_the_finite_ones(tmp_path: Path) -> None:
    maps, masks = _maps()
    anomaly = maps["anomaly"].copy()
    # A wrong scale only shows where float16 overflows (or underflows): values far beyond its 65504.
    anomaly[0] *= 1e5
    anomaly[0, 0, 0], anomaly[0, 1, 1], anomaly[1, 2, 2] = np.inf, -np.inf, np.nan
    anomaly[2] = np.nan  # nothing finite at all
    anomaly[3] = -1e4 * np.abs(anomaly[3]) - 1e-3  # finite; its peak is its most negative value
    path = tmp_path / "a.maps"
    write_maps(path, 4, R, {"anomaly": anomaly}, masks, "float16")
    for i in range(4):
        m = anomaly[i]
        finite = m[np.isfinite(m)]
        e = -int(np.floor(np.log2(np.abs(finite).max()))) if finite.size else 0
        want = np.where(np.isfinite(m), np.ldexp(np.ldexp(m, e).astype(np.float16).astype(np.float32), -e), m)
        np.testing.assert_array_equal(read_maps(path, i, "test")["anomaly"], want)


def _blob_span(path: Path, local: int) -> tuple[int, int]:
    data = path.read_bytes()
    table_at, meta_len, _ = struct.unpack("<QQ8s", data[-24:])
    start, end = np.frombuffer(data[table_at + 8 * local : table_at + 8 * local + 16], dtype="<i8")
    return int(start), int(end)


def test_a_damaged_blob_is_named_and_the_other_images_still_load(tmp_path: Path) -> None:
    maps, masks = _maps()
    path = tmp_path / "a.maps"
    write_maps(path, 4, R, maps, masks, "float16")
    start, end = _blob_span(path, 1)
    data = bytearray(path.read_bytes())
    data[start + 4 : end - 4] = bytes(end - start - 8)  # zero the middle of image 1's frame
    path.write_bytes(bytes(data))
    with pytest.raises(RunDataMissing, match=r"a\.maps is corrupt or incomplete: image 1's blob does not decompress"):
        read_maps(path, 1, "run x")
    np.testing.assert_array_equal(read_maps(path, 2, "run x")["mask"], masks[2])


def test_format_1_files_with_zlib_blobs_are_still_read(tmp_path: Path) -> None:
    """Files written before zstd (format 1: zlib blobs, no codec in the header) load unchanged."""
    maps, masks = _maps()
    new = tmp_path / "new.maps"
    write_maps(new, 4, R, maps, masks, "float16")
    data = new.read_bytes()
    table_at, meta_len, magic = struct.unpack("<QQ8s", data[-24:])
    meta = json.loads(data[-24 - meta_len : -24])
    assert meta["format"] == 2 and meta["codec"] == "zstd"
    size = len(meta["maps"]) * (16 + 2 * R * R) + (R * R + 7) // 8
    # Rewrite it as format 1: the same blobs, zlib-compressed, and the old header.
    old = bytearray(data[:16])
    offsets = [len(old)]
    for i in range(4):
        start, end = _blob_span(new, i)
        raw = pa.Codec("zstd").decompress(data[start:end], decompressed_size=size, asbytes=True)
        old += zlib.compress(raw, 1)
        offsets.append(len(old))
    table = len(old)
    old += np.asarray(offsets, dtype="<i8").tobytes()
    meta_old = json.dumps({k: v for k, v in {**meta, "format": 1}.items() if k != "codec"}).encode()
    old += meta_old + struct.pack("<QQ8s", table, len(meta_old), magic)
    path = tmp_path / "old.maps"
    path.write_bytes(bytes(old))
    for i in range(4):
        got, want = read_maps(path, i, "test"), read_maps(new, i, "test")
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
