"""Writers of broken dataset files, for the fault-matrix tests.

Each helper makes one realistic fault cheaply (no large allocation, even for the
20000 x 20000 image) and returns the path it wrote.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def truncated_png(source: Path, dest: Path, keep: float = 0.6) -> Path:
    """``source`` cut to ``keep`` of its bytes: the header still parses, the pixel data is short."""
    data = source.read_bytes()
    dest.write_bytes(data[: int(len(data) * keep)])
    return dest


def zero_byte(dest: Path) -> Path:
    dest.write_bytes(b"")
    return dest


def jpeg_named_png(dest: Path, size: int = 64) -> Path:
    """A valid JPEG saved under a ``.png`` name (readers must go by content, not extension)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    dest.write_bytes(buf.getvalue())
    return dest


def one_pixel(dest: Path) -> Path:
    Image.new("RGB", (1, 1), (128, 64, 32)).save(dest)
    return dest


def huge_png(dest: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 1-bit PNG of ``width x height`` (a decompression bomb), written row by row.

    The file is about 50 KB; nothing of the decoded size is ever allocated here.
    """
    comp = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits, all zero
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    dest.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return dest


def symlink_loop(directory: Path, name: str = "loop") -> tuple[Path, Path]:
    """Two ``.png`` links pointing at each other (ELOOP on open)."""
    a, b = directory / f"{name}_a.png", directory / f"{name}_b.png"
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    return a, b


def non_utf8_copy(source: Path, directory: Path) -> Path:
    """A copy of ``source`` whose file name is not valid UTF-8 (Latin-1 bytes, as from an old share)."""
    raw = os.fsencode(directory) + b"/pi\xe8ce_\xff.png"
    with open(raw, "wb") as fh:
        fh.write(source.read_bytes())
    return Path(os.fsdecode(raw))


@contextlib.contextmanager
def unreadable(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> Iterator[None]:
    """Make ``paths`` fail to open with EACCES, as ``chmod 000`` does for a normal user.

    Tests run as root, for whom ``chmod 000`` blocks nothing, so ``builtins.open`` (what
    Pillow and the feature cache's hashing use) is patched instead.
    """
    blocked = {os.path.abspath(p) for p in paths}
    real_open = builtins.open

    def guarded(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", guarded)
        yield
