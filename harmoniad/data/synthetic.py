"""The embedded synthetic dataset: seeded, exact masks, MVTec layout, no download.

Two texture categories (``weave``, ``grain``) and two object categories (``flange``,
``circuit``) with both kinds of defect HarmoniAD is about: fine *structural* ones
(scratches 1-3 px wide, cracks, pin holes: high-frequency) and *semantic* ones (stains,
colour shifts, a missing or displaced part: low-frequency / global). Normal images vary
(phase, rotation, position, lighting, sensor noise) so a detector has to learn the normal
population rather than memorise one picture; defects are drawn strongly enough to be
visible against that variation.

Every image has its own random stream derived from ``(seed, category, split, defect,
index)``, so the same seed gives the same bytes whatever subset of categories is written.
A defect is painted only inside its mask and the mask is exactly the painted region:
``render_sample`` returns the defect-free rendering of the same draw so tests can check it.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from harmoniad.runtime.atomic import atomic_write_bytes, atomic_write_text
from harmoniad.data.readers import SYNTHETIC_MANIFEST
from harmoniad.data.records import GOOD, DatasetError
from harmoniad.runtime.paths import cache_dir
from harmoniad.runtime.progress import Progress, ProgressFn

GENERATOR_VERSION = 1
MANIFEST = SYNTHETIC_MANIFEST  # written first (complete: false) and last (complete: true)

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("weave", "grain", "flange", "circuit")
SYNTHETIC_CATEGORY_KINDS: Mapping[str, str] = MappingProxyType(
    {"weave": "texture", "grain": "texture", "flange": "object", "circuit": "object"}
)
SYNTHETIC_DEFECTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "weave": ("scratch", "pinhole", "crack", "stain", "color"),
        "grain": ("scratch", "crack", "pinhole", "stain", "color"),
        "flange": ("scratch", "crack", "stain", "missing", "displaced"),
        "circuit": ("scratch", "pinhole", "color", "missing", "displaced"),
    }
)
DEFECT_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "scratch": "structural",
        "crack": "structural",
        "pinhole": "structural",
        "stain": "semantic",
        "color": "semantic",
        "missing": "semantic",
        "displaced": "semantic",
    }
)

_PNG_COMPRESS_LEVEL = 1  # fixed: same settings give the same bytes
_NOISE_STD = 0.012  # sensor noise, about 3 grey levels
_MIN_MASK_PX = 4
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

Float = np.ndarray  # float32 arrays, H x W or H x W x 3, values in [0, 1]


@dataclass(frozen=True)
class Rendered:
    """One generated image: the image, its mask (None when normal) and the defect-free draw."""

    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray | None  # H x W bool
    reference: np.ndarray  # H x W x 3 uint8, the same draw without the defect


class _Grid:
    """Pixel-centre coordinates of one image size, and the shapes drawn on them."""

    def __init__(self, size: int) -> None:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.size = size
        self.yy = yy
        self.xx = xx

    def disc(self, cx: float, cy: float, r: float) -> np.ndarray:
        """Pixels whose centre is within ``r`` of ``(cx, cy)``; work limited to the bounding box."""
        s = self.size
        out = np.zeros((s, s), dtype=bool)
        x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, s)
        y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, s)
        if x0 < x1 and y0 < y1:
            dx = self.xx[0, x0:x1] - cx
            dy = self.yy[y0:y1, 0] - cy
            out[y0:y1, x0:x1] = dy[:, None] ** 2 + dx[None, :] ** 2 <= r * r
        return out

    def rect(self, cx: float, cy: float, hw: float, hh: float) -> np.ndarray:
        """Pixels whose centre is in the axis-aligned box of half-sizes ``hw`` x ``hh``."""
        cols = np.abs(self.xx[0] - cx) <= hw
        rows = np.abs(self.yy[:, 0] - cy) <= hh
        return rows[:, None] & cols[None, :]

    def stroke(self, points: np.ndarray, width: float) -> np.ndarray:
        """Pixels within ``width / 2`` of a polyline (exact distance to each segment)."""
        s = self.size
        half = width / 2.0
        x0, y0 = np.floor(points.min(axis=0) - half - 1).astype(int)
        x1, y1 = np.ceil(points.max(axis=0) + half + 2).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, s), min(y1, s)
        out = np.zeros((s, s), dtype=bool)
        if x0 >= x1 or y0 >= y1:
            return out
        xx = self.xx[y0:y1, x0:x1]
        yy = self.yy[y0:y1, x0:x1]
        best = np.full(xx.shape, np.inf, dtype=np.float32)
        for (ax, ay), (bx, by) in itertools.pairwise(points):
            dx, dy = bx - ax, by - ay
            length2 = dx * dx + dy * dy
            if length2 == 0:
                t = np.zeros_like(xx)
            else:
                t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / length2, 0.0, 1.0)
            np.minimum(best, (xx - ax - t * dx) ** 2 + (yy - ay - t * dy) ** 2, out=best)
        out[y0:y1, x0:x1] = best <= half * half
        return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Float:
    """Zero-mean, unit-std periodic noise with about ``cells`` blobs across the image.

    A ``cells x cells`` random grid spread over the image by a separable periodic Gaussian
    kernel: two small matrix products instead of a full-image filter.
    """
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size) - 0.5
    d = pos[:, None] - np.arange(cells, dtype=np.float32)[None, :]
    d = (d + cells / 2) % cells - cells / 2  # circular distance, in cells
    weights = np.exp(-0.5 * (d / 0.6) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    # Broadcast sums rather than ``@``: tiny products where BLAS threads only add contention.
    rows = (weights[:, :, None] * coarse[None, :, :]).sum(axis=1)  # size x cells
    field = (rows[:, None, :] * weights[None, :, :]).sum(axis=2)  # size x size
    return (field - field.mean()) / (field.std() + 1e-6)


def _rgb(colour: Sequence[float], lum: Float) -> Float:
    return lum[..., None] * np.asarray(colour, dtype=np.float32)


# --------------------------------------------------------------------------- textures


def _weave(g: _Grid, rng: np.random.Generator) -> Float:
    """Woven fabric: over/under threads on a slightly rotated, shifted lattice."""
    s = g.size
    theta = rng.uniform(-0.06, 0.06)
    period = s / 16 * rng.uniform(0.97, 1.03)
    px, py = rng.uniform(0, 2 * period, size=2).tolist()
    c, sn = math.cos(theta), math.sin(theta)  # Python floats keep the float32 arrays float32
    u = (g.xx * c + g.yy * sn + px) / period
    v = (-g.xx * sn + g.yy * c + py) / period
    fu, fv = u % 1.0, v % 1.0
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    thread = np.where(over, su**0.7 * (0.8 + 0.2 * sv), sv**0.7 * (0.8 + 0.2 * su))
    light = 0.03 * _smooth_noise(rng, s, 5)
    lum = (0.35 + 0.75 * thread) * rng.uniform(0.96, 1.04) + light
    return _rgb((0.45, 0.52, 0.62), lum.astype(np.float32))


def _grain(g: _Grid, rng: np.random.Generator) -> Float:
    """Wood grain: warped growth rings plus fine fibres along the grain."""
    s = g.size
    warp = _smooth_noise(rng, s, 6)
    t = g.yy + 0.03 * float(rng.standard_normal()) * g.xx + s * 0.05 * warp + rng.uniform(0, s)
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * t / (s / 14))) ** 2.5
    fibre = ndimage.gaussian_filter(rng.standard_normal((s, s)).astype(np.float32), (0.7, 6.0), mode="wrap")
    fibre /= fibre.std() + 1e-6
    lum = 0.88 - 0.3 * rings + 0.035 * fibre
    return _rgb((0.80, 0.58, 0.36), (lum * rng.uniform(0.96, 1.04)).astype(np.float32))


# --------------------------------------------------------------------------- objects


def _flange_params(g: _Grid, rng: np.random.Generator) -> dict[str, Any]:
    s = g.size
    cx, cy = (s / 2 + rng.uniform(-0.02 * s, 0.02 * s, size=2)).tolist()
    theta0 = rng.uniform(0, 2 * np.pi)
    bolt_r = 0.255 * s
    holes = [
        (cx + bolt_r * math.cos(theta0 + k * math.pi / 2), cy + bolt_r * math.sin(theta0 + k * math.pi / 2))
        for k in range(4)
    ]
    return {
        "cx": cx,
        "cy": cy,
        "theta0": theta0,
        "light": rng.uniform(0.6, 1.0),
        "gain": rng.uniform(0.96, 1.04),
        "holes": holes,
        "chip": None,
    }


def _flange_draw(p: Mapping[str, Any], g: _Grid) -> tuple[Float, np.ndarray]:
    """A machined disc with a centre bore and four bolt holes on a dark table."""
    s = g.size
    dx, dy = g.xx - p["cx"], g.yy - p["cy"]
    rr = np.sqrt(dx * dx + dy * dy)
    ang = np.arctan2(dy, dx)
    metal = (rr <= 0.38 * s) & (rr >= 0.13 * s)
    for hx, hy in p["holes"]:
        metal &= ~g.disc(hx, hy, 0.045 * s)
    if p["chip"] is not None:
        metal &= ~g.disc(*p["chip"])
    shade = 0.62 + 0.12 * np.cos(ang - p["light"]) + 0.035 * np.sin(2 * np.pi * rr / (s / 85))
    shade = shade + 0.08 * (rr > 0.34 * s) - 0.06 * (rr < 0.16 * s)
    metal_rgb = _rgb((0.78, 0.79, 0.83), (shade * p["gain"]).astype(np.float32))
    table = _rgb((0.16, 0.17, 0.19), (1.0 + 0.15 * g.yy / s).astype(np.float32))
    return np.where(metal[..., None], metal_rgb, table), metal


def _flange_variant(p: dict[str, Any], defect: str, s: int, rng: np.random.Generator) -> dict[str, Any]:
    q = dict(p)
    if defect == "missing":  # a chunk broken out of the rim
        phi = rng.uniform(0, 2 * np.pi)
        q["chip"] = (
            p["cx"] + 0.39 * s * math.cos(phi),
            p["cy"] + 0.39 * s * math.sin(phi),
            rng.uniform(0.08, 0.11) * s,
        )
    elif defect == "displaced":  # one bolt hole drilled off the bolt circle
        k = int(rng.integers(4))
        hx, hy = p["holes"][k]
        step = 0.1 * s * (1 if rng.random() < 0.5 else -1)
        ux, uy = (hx - p["cx"]) / (0.255 * s), (hy - p["cy"]) / (0.255 * s)
        q["holes"] = [h if i != k else (hx + step * ux, hy + step * uy) for i, h in enumerate(p["holes"])]
    else:
        raise ValueError(f"flange has no part defect {defect!r}")
    return q


_CIRCUIT_CAPS = ((0.22, 0.76), (0.50, 0.76), (0.78, 0.76))
_CIRCUIT_RES = ((0.16, 0.36), (0.84, 0.36))


def _circuit_params(g: _Grid, rng: np.random.Generator) -> dict[str, Any]:
    s = g.size
    ox, oy = rng.uniform(-0.02 * s, 0.02 * s, size=2).tolist()

    def place(fx: float, fy: float) -> tuple[float, float]:
        jx, jy = rng.uniform(-0.004 * s, 0.004 * s, size=2).tolist()
        return fx * s + ox + jx, fy * s + oy + jy

    parts: list[dict[str, Any]] = [{"kind": "ic", "at": place(0.5, 0.36), "colour": (0.10, 0.10, 0.11)}]
    parts += [{"kind": "cap", "at": place(fx, fy), "colour": (0.15, 0.30, 0.65)} for fx, fy in _CIRCUIT_CAPS]
    parts += [{"kind": "res", "at": place(fx, fy), "colour": (0.82, 0.72, 0.52)} for fx, fy in _CIRCUIT_RES]
    return {
        "offset": (ox, oy),
        "parts": parts,
        "board": _smooth_noise(rng, s, 12),
        "gain": rng.uniform(0.95, 1.05),
    }


def _circuit_draw(p: Mapping[str, Any], g: _Grid) -> tuple[Float, np.ndarray]:
    """A green board with copper traces, an IC, three capacitors and two resistors."""
    s = g.size
    ox, oy = p["offset"]
    img = _rgb((0.12, 0.42, 0.22), (0.95 + 0.03 * p["board"] + 0.06 * g.xx / s).astype(np.float32))
    copper = np.zeros((s, s), dtype=bool)
    w = 0.014 * s
    for (x0, y0), (x1, y1) in (
        ((0.16, 0.36), (0.5, 0.36)),
        ((0.5, 0.36), (0.84, 0.36)),
        ((0.22, 0.52), (0.78, 0.52)),
        ((0.22, 0.52), (0.22, 0.76)),
        ((0.50, 0.46), (0.50, 0.76)),
        ((0.78, 0.52), (0.78, 0.76)),
    ):
        copper |= g.stroke(np.array([[x0 * s + ox, y0 * s + oy], [x1 * s + ox, y1 * s + oy]], np.float32), w)
    for fx, fy in ((0.07, 0.07), (0.93, 0.07), (0.07, 0.93), (0.93, 0.93)):
        copper |= g.disc(fx * s + ox, fy * s + oy, 0.035 * s)
    img[copper] = (0.72, 0.55, 0.28)
    for part in p["parts"]:
        cx, cy = part["at"]
        if part["kind"] == "ic":
            for k in range(7):
                px = cx + (k - 3) * 0.04 * s
                for side in (-1, 1):
                    img[g.rect(px, cy + side * 0.115 * s, 0.01 * s, 0.02 * s)] = (0.78, 0.78, 0.80)
            img[g.rect(cx, cy, 0.15 * s, 0.10 * s)] = part["colour"]
            img[g.disc(cx - 0.12 * s, cy - 0.07 * s, 0.015 * s)] = (0.35, 0.35, 0.37)
        elif part["kind"] == "cap":
            img[g.disc(cx, cy, 0.065 * s)] = part["colour"]
            img[g.disc(cx, cy, 0.045 * s)] = (0.70, 0.72, 0.76)
            img[g.rect(cx - 0.05 * s, cy, 0.008 * s, 0.03 * s)] = (0.85, 0.85, 0.9)
        else:
            img[g.rect(cx, cy, 0.035 * s, 0.075 * s)] = part["colour"]
            for off, band in (
                (-0.035, (0.7, 0.1, 0.1)),
                (-0.01, (0.45, 0.15, 0.55)),
                (0.015, (0.4, 0.25, 0.1)),
            ):
                img[g.rect(cx, cy + off * s, 0.035 * s, 0.006 * s)] = band
    return img * np.float32(p["gain"]), np.ones((s, s), dtype=bool)


def _circuit_variant(p: dict[str, Any], defect: str, s: int, rng: np.random.Generator) -> dict[str, Any]:
    parts = [dict(part) for part in p["parts"]]
    movable = list(range(1, len(parts)))  # capacitors and resistors
    k = movable[int(rng.integers(len(movable)))]
    if defect == "missing":
        del parts[k]
    elif defect == "displaced":
        cx, cy = parts[k]["at"]
        if parts[k]["kind"] == "cap":  # pushed up towards the IC
            parts[k]["at"] = (cx, cy - rng.uniform(0.14, 0.16) * s)
        else:  # slid inwards along its trace
            parts[k]["at"] = (cx + np.sign(s / 2 - cx) * rng.uniform(0.09, 0.11) * s, cy)
    elif defect == "color":  # the wrong part: a body of another colour
        parts[k]["colour"] = (0.80, 0.25, 0.12) if parts[k]["kind"] == "cap" else (0.25, 0.45, 0.80)
    else:
        raise ValueError(f"circuit has no part defect {defect!r}")
    return {**p, "parts": parts}


@dataclass(frozen=True)
class _Category:
    """How to draw one category: random parameters of a normal draw, then pixels from them.

    Object categories redraw from altered parameters (``variant``) for part defects, so a
    missing or displaced part changes exactly the pixels it covers.
    """

    params: Callable[[_Grid, np.random.Generator], Any]
    draw: Callable[[Any, _Grid], tuple[Float, np.ndarray]]
    variant: Callable[[Any, str, int, np.random.Generator], Any] | None
    part_defects: frozenset[str]
    scratch_colour: tuple[float, float, float]
    stain_colour: tuple[float, float, float]
    shift_colour: tuple[float, float, float]


def _texture_draw(p: Float, g: _Grid) -> tuple[Float, np.ndarray]:
    """A texture's parameters are its pixels; all of it is foreground."""
    return p, np.ones((g.size, g.size), dtype=bool)


_CATEGORIES: Mapping[str, _Category] = MappingProxyType(
    {
        "weave": _Category(
            params=_weave,
            draw=_texture_draw,
            variant=None,
            part_defects=frozenset(),
            scratch_colour=(0.95, 0.93, 0.85),
            stain_colour=(0.30, 0.20, 0.08),
            shift_colour=(0.90, 0.50, 0.15),
        ),
        "grain": _Category(
            params=_grain,
            draw=_texture_draw,
            variant=None,
            part_defects=frozenset(),
            scratch_colour=(0.98, 0.95, 0.88),
            stain_colour=(0.18, 0.18, 0.24),
            shift_colour=(0.25, 0.55, 0.65),
        ),
        "flange": _Category(
            params=_flange_params,
            draw=_flange_draw,
            variant=_flange_variant,
            part_defects=frozenset({"missing", "displaced"}),
            scratch_colour=(0.20, 0.18, 0.16),
            stain_colour=(0.35, 0.22, 0.08),
            shift_colour=(0.85, 0.45, 0.20),
        ),
        "circuit": _Category(
            params=_circuit_params,
            draw=_circuit_draw,
            variant=_circuit_variant,
            part_defects=frozenset({"missing", "displaced", "color"}),
            scratch_colour=(0.92, 0.92, 0.88),
            stain_colour=(0.30, 0.25, 0.10),
            shift_colour=(0.80, 0.25, 0.12),
        ),
    }
)


# --------------------------------------------------------------------------- surface defects


def _point_in(fg: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[float, float]:
    """A random foreground pixel at least ``margin`` pixels from the border."""
    s = fg.shape[0]
    inner = np.zeros_like(fg)
    inner[margin : s - margin, margin : s - margin] = fg[margin : s - margin, margin : s - margin]
    ys, xs = np.nonzero(inner if inner.any() else fg)
    i = int(rng.integers(len(xs)))
    return float(xs[i]), float(ys[i])


def _surface_region(defect: str, g: _Grid, fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where a surface defect goes: thin strokes, tiny discs or a ragged blob."""
    s = g.size
    if defect == "scratch":
        cx, cy = _point_in(fg, rng, s // 6)
        a = rng.uniform(0, np.pi)
        half = rng.uniform(0.15, 0.3) * s
        bend = rng.uniform(-0.08, 0.08) * s
        t = np.linspace(-1, 1, 9, dtype=np.float32)[:, None]
        along = np.array([np.cos(a), np.sin(a)], np.float32)
        across = np.array([-np.sin(a), np.cos(a)], np.float32)
        pts = np.array([cx, cy], np.float32) + t * half * along + (1 - t**2) * bend * across
        return g.stroke(pts, float(rng.integers(1, 4)))  # 1, 2 or 3 px wide
    if defect == "crack":
        x, y = _point_in(fg, rng, s // 5)
        heading = rng.uniform(0, 2 * np.pi)
        step = s / 40
        pts = [(x, y)]
        for _ in range(int(rng.integers(10, 16))):
            heading += rng.uniform(-0.6, 0.6)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            pts.append((x, y))
        region = g.stroke(np.array(pts, np.float32), float(rng.integers(1, 3)))
        bx, by = pts[len(pts) // 2]
        heading = rng.uniform(0, 2 * np.pi)
        branch = [(bx, by)]
        for _ in range(int(rng.integers(4, 8))):
            heading += rng.uniform(-0.6, 0.6)
            bx, by = bx + step * math.cos(heading), by + step * math.sin(heading)
            branch.append((bx, by))
        return region | g.stroke(np.array(branch, np.float32), 1.0)
    if defect == "pinhole":
        cx, cy = _point_in(fg, rng, s // 8)
        region = np.zeros((s, s), dtype=bool)
        for _ in range(int(rng.integers(2, 6))):
            ox, oy = rng.uniform(-0.06 * s, 0.06 * s, size=2).tolist()
            region |= g.disc(cx + ox, cy + oy, rng.uniform(1.0, 2.5))
        return region
    if defect in ("stain", "color"):
        cx, cy = _point_in(fg, rng, s // 6)
        lo, hi = (0.06, 0.12) if defect == "stain" else (0.10, 0.18)
        rx, ry = (rng.uniform(lo, hi, size=2) * s).tolist()
        a = rng.uniform(0, np.pi)
        dx, dy = g.xx - cx, g.yy - cy
        u = (dx * math.cos(a) + dy * math.sin(a)) / rx
        v = (-dx * math.sin(a) + dy * math.cos(a)) / ry
        return u * u + v * v + 0.35 * _smooth_noise(rng, s, 10) < 1.0
    raise ValueError(f"unknown surface defect {defect!r}")


def _paint(defect: str, img: Float, region: np.ndarray, cat: _Category) -> Float:
    """Paint ``defect`` into ``img`` inside ``region`` only."""
    out = img.copy()
    px = img[region]
    if defect == "scratch":
        out[region] = 0.25 * px + 0.75 * np.asarray(cat.scratch_colour, np.float32)
    elif defect == "crack":
        out[region] = 0.15 * px + 0.85 * np.float32(0.04)
    elif defect == "pinhole":
        out[region] = 0.05 * px + 0.95 * np.float32(0.02)
    elif defect == "stain":
        out[region] = 0.5 * px + 0.5 * np.asarray(cat.stain_colour, np.float32)
    elif defect == "color":
        target = np.asarray(cat.shift_colour, np.float32)
        lum = (px * _LUMA).sum(axis=1)
        recoloured = lum[:, None] * target / float((target * _LUMA).sum())
        out[region] = 0.15 * px + 0.85 * recoloured
    else:
        raise ValueError(f"unknown surface defect {defect!r}")
    return out


def _to_uint8(img: Float) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render_sample(category: str, defect: str, size: int, rng: np.random.Generator) -> Rendered:
    """Draw one image of ``category`` with ``defect`` (``"good"`` for none), from ``rng``.

    The defect-free ``reference`` shares every random choice (pose, lighting, noise) with
    ``image``, so ``image`` and ``reference`` differ only inside ``mask``.
    """
    if category not in _CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; expected one of {SYNTHETIC_CATEGORIES}")
    if defect != GOOD and defect not in SYNTHETIC_DEFECTS[category]:
        raise ValueError(
            f"{category} has no defect {defect!r}; expected one of {SYNTHETIC_DEFECTS[category]}"
        )
    cat = _CATEGORIES[category]
    g = _Grid(size)
    params = cat.params(g, rng)
    clean, fg = cat.draw(params, g)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(_NOISE_STD)
    reference = _to_uint8(clean + noise)
    if defect == GOOD:
        return Rendered(reference, None, reference)
    for _ in range(20):  # resample the rare draw that lands (almost) off the object
        if defect in cat.part_defects:
            assert cat.variant is not None
            broken, _ = cat.draw(cat.variant(params, defect, size, rng), g)
            mask = np.abs(broken - clean).max(axis=2) > 0
            image = _to_uint8(np.where(mask[..., None], broken, clean) + noise)
        else:
            mask = _surface_region(defect, g, fg, rng) & fg
            image = _to_uint8(_paint(defect, clean + noise, mask, cat))
        if mask.sum() >= _MIN_MASK_PX:
            return Rendered(image, mask, reference)
    raise RuntimeError(f"could not place a {defect} defect on {category} at size {size}")


# --------------------------------------------------------------------------- writing


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def _rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    key = (zlib.crc32(category.encode()), zlib.crc32(split.encode()), zlib.crc32(defect.encode()), index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _test_plan(category: str, n_test: int) -> list[str]:
    """Defect of each test image: about half defective, defect types in turn."""
    types = SYNTHETIC_DEFECTS[category]
    n_bad = n_test // 2
    return [GOOD] * (n_test - n_bad) + [types[i % len(types)] for i in range(n_bad)]


def _settings(seed: int, categories: Sequence[str], n_train: int, n_test: int, size: int) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "categories": list(categories),
        "n_train": n_train,
        "n_test": n_test,
        "size": size,
    }


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _prepare_root(root: Path, settings: dict[str, Any]) -> None:
    """Make ``root`` ready to hold exactly this dataset, never touching foreign files."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a directory; expected a folder for the dataset")
    old = _read_manifest(root)
    if old is None:
        if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):
            raise DatasetError(
                f"{root}: not empty and not a synthetic dataset (no {MANIFEST}); "
                "expected an empty or new folder"
            )
    else:
        same = {k: old.get(k) for k in settings} == settings
        if not same:  # other settings: drop our old category trees so no stale file survives
            for name in old.get("categories", []):
                if name in _CATEGORIES and (root / name).is_dir():
                    shutil.rmtree(root / name)
    atomic_write_text(root / MANIFEST, json.dumps({**settings, "complete": False}, indent=2) + "\n")


def make_synthetic(
    root: str | os.PathLike[str],
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 40,
    n_test: int = 30,
    size: int = 256,
    progress: ProgressFn | None = None,
) -> Path:
    """Write the synthetic dataset in the MVTec layout under ``root`` and return ``root``.

    ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}`` with
    PNG images and 0/255 ``<stem>_mask.png`` masks; about half of each category's test
    images are defective. ``<root>/synthetic.json`` records the settings and says
    ``"complete": true`` only once everything is written. ``root`` must be new, empty or an
    earlier synthetic dataset. The same arguments always give the same bytes.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if n_train < 1 or n_test < 2:
        raise ValueError(f"need n_train >= 1 and n_test >= 2, got {n_train} and {n_test}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    chosen = list(SYNTHETIC_CATEGORIES if categories is None else dict.fromkeys(categories))
    unknown = [c for c in chosen if c not in _CATEGORIES]
    if unknown or not chosen:
        raise ValueError(f"synthetic categories {unknown or chosen}; expected some of {SYNTHETIC_CATEGORIES}")

    root = Path(root)
    settings = _settings(seed, chosen, n_train, n_test, size)
    _prepare_root(root, settings)
    width = max(3, len(str(max(n_train, n_test))))
    tracker = Progress("synthetic data", len(chosen) * (n_train + n_test), progress)
    for category in chosen:
        base = root / category
        for i in range(n_train):
            out = render_sample(category, GOOD, size, _rng(seed, category, "train", GOOD, i))
            atomic_write_bytes(base / "train" / GOOD / f"{i:0{width}d}.png", _png_bytes(out.image))
            tracker.update(category=category)
        counters: dict[str, int] = {}
        for defect in _test_plan(category, n_test):
            i = counters[defect] = counters.get(defect, -1) + 1
            out = render_sample(category, defect, size, _rng(seed, category, "test", defect, i))
            stem = f"{i:0{width}d}"
            atomic_write_bytes(base / "test" / defect / f"{stem}.png", _png_bytes(out.image))
            if out.mask is not None:
                mask_png = _png_bytes(out.mask.astype(np.uint8) * 255)
                atomic_write_bytes(base / "ground_truth" / defect / f"{stem}_mask.png", mask_png)
            tracker.update(category=category)
    atomic_write_text(root / MANIFEST, json.dumps({**settings, "complete": True}, indent=2) + "\n")
    return root


def synthetic_is_complete(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 40,
    n_test: int = 30,
    size: int = 256,
) -> bool:
    """True when ``root`` holds a finished synthetic dataset made with exactly these settings."""
    chosen = list(SYNTHETIC_CATEGORIES if categories is None else dict.fromkeys(categories))
    wanted = _settings(seed, chosen, n_train, n_test, size)
    found = _read_manifest(Path(root))
    return found is not None and found.get("complete") is True and {k: found.get(k) for k in wanted} == wanted


def ensure_synthetic(
    root: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 40,
    n_test: int = 30,
    size: int = 256,
    progress: ProgressFn | None = None,
) -> Path:
    """The synthetic dataset, generated once (default: under ``cache_dir()/datasets/synthetic``).

    A finished dataset with these settings is reused as is; an interrupted generation (its
    manifest is not ``complete``), or one made with other settings or another generator
    version, is redone.
    """
    target = Path(root) if root is not None else cache_dir() / "datasets" / "synthetic"
    settings = {"seed": seed, "categories": categories, "n_train": n_train, "n_test": n_test, "size": size}
    if synthetic_is_complete(target, **settings):
        return target
    return make_synthetic(target, **settings, progress=progress)
