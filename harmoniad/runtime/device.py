"""Device and precision choice in one place: CUDA + bf16 when present, else CPU fp32.

Also what keeps GPU work running on any device: :class:`AdaptiveBatch` halves a chunk after
a CUDA out-of-memory error (a batch that is too large slows a run down instead of failing it)
and :func:`maybe_compile` applies ``torch.compile`` when asked (off by default: compilation
takes a while and only pays off on long runs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None picks CUDA when available, else CPU; other names are checked."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(name)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA; a no-op on CPU, where fp32 is both exact and fast enough."""
    if enabled and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def is_oom(exc: BaseException) -> bool:
    """A device out-of-memory error: ``torch.OutOfMemoryError``, or the plain ``RuntimeError``
    ("CUDA out of memory", "CUDA error: out of memory", cuDNN/cuBLAS alloc failures) that
    older drivers and some kernels raise instead."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(sign in text for sign in ("out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed"))


def batch_size_for(
    device: torch.device,
    bytes_per_item: int,
    *,
    default: int = 16,
    minimum: int = 8,
    maximum: int = 256,
    fraction: float = 0.5,
) -> int:
    """Batch size from the device's free memory: ``fraction`` of it over ``bytes_per_item``.

    Clamped to ``[minimum, maximum]`` and rounded down to a multiple of 8 (tensor-core
    friendly). On the CPU, ``default`` (large batches buy nothing there and cost memory).
    An estimate that is too large is caught by :class:`AdaptiveBatch`.
    """
    if device.type != "cuda":
        return default
    free, _ = torch.cuda.mem_get_info(device)
    size = int(free * fraction) // max(1, bytes_per_item)
    size = max(minimum, min(maximum, size))
    return max(minimum, size - size % 8)


def cast_for_inference(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module ready for inference on ``device``: on CUDA its floating weights cast to bf16 once.

    Under autocast, fp32 weights are re-cast to bf16 on every forward; a frozen network
    used only for inference pays that for nothing. Norm layers keep fp32 weights (autocast
    runs them in fp32 anyway). On the CPU the module itself is returned, unchanged.
    """
    return bf16_weights(module) if device.type == "cuda" else module


def bf16_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Cast ``module``'s floating parameters to bf16 in place and freeze it; returns it.

    Norm layers and scalar parameters (a learnable cutoff, a scale) keep fp32: they cost
    nothing, and rounding a cutoff to bf16 would move the frequency split itself.
    """
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    for sub in module.modules():
        if isinstance(sub, norms):
            continue
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.is_floating_point() and param.ndim > 0:
                setattr(sub, name, torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
    return module.requires_grad_(False)


class AdaptiveBatch:
    """Chunked execution that halves the chunk size on CUDA out-of-memory and retries.

    ``size`` is the starting chunk size; after an OOM the smaller size sticks for the rest
    of this object's life (later batches would not fit either). An OOM at ``minimum`` is
    re-raised: the work does not fit at all. Other errors pass through untouched.
    """

    def __init__(self, size: int, minimum: int = 1) -> None:
        if size < 1 or not 1 <= minimum <= size:
            raise ValueError(f"AdaptiveBatch: need 1 <= minimum <= size, got size={size}, minimum={minimum}")
        self.size = size
        self.minimum = minimum

    def run(self, n: int, fn: Callable[[int, int], T]) -> list[T]:
        """``[fn(start, stop) for each chunk of range(n)]``, chunks as large as fit."""
        out: list[T] = []
        start = 0
        while start < n:
            stop = min(n, start + self.size)
            oom = False
            try:
                out.append(fn(start, stop))
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(exc) or self.size <= self.minimum:
                    raise
                oom = True
            if oom:
                # Outside the except block, so the failed attempt's tensors are already freed.
                torch.cuda.empty_cache()
                self.size = max(self.minimum, self.size // 2)
                log.warning("CUDA out of memory; retrying with batches of %d", self.size)
                continue
            start = stop
        return out


def maybe_compile(module: Any, enabled: bool) -> Any:
    """``torch.compile(module)`` when ``enabled`` (the same object otherwise).

    The compiled wrapper shares parameters and state with ``module``; save and load the
    original, not the wrapper.
    """
    if not enabled:
        return module
    return torch.compile(module)
