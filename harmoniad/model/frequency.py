"""Frequency split of feature maps (docs/design.md#frequency-split).

A layer map ``F`` (B x C x h x w) is moved to the frequency domain with an orthonormal 2-D
FFT over ``h x w``; a radial low-pass mask keeps the frequencies below a cutoff and the
inverse FFT gives ``F_low``. ``F_high`` is *defined* as ``F - F_low``, so the two parts
always sum back to ``F`` (to float rounding), whatever the mask.

Radius convention. Frequencies are measured per axis in units of that axis' Nyquist
frequency (half a cycle per patch), so the Nyquist frequency is 1 on both axes even on a
non-square grid; the radius is ``sqrt(fy**2 + fx**2)`` and the corner of the (centred)
spectrum is at ``sqrt(2)`` for even sizes (slightly less for odd sizes).

Mask convention. The cutoff ``r`` is the radius where the low part *ends*: the mask is
exactly 0 at every radius ``>= r``. Hard edge: 1 where ``radius < r``. Soft edge of width
``s``: 1 inside ``r - s``, a raised-cosine ramp from 1 to 0 on ``[r - s, r]``, 0 beyond.
Consequences, for any ``s``: ``r = 0`` gives an empty mask (the DC term too), so
everything is high-frequency; ``r > corner + s`` gives a full mask, so everything is
low-frequency.

The mask depends only on ``|fy|`` and ``|fx|``, so it is Hermitian-symmetric and the
split can use the real FFT (``rfft2``/``irfft2``): the result equals the centred
(``fftshift``) full-spectrum computation exactly and costs half as much.

The low-pass filter is linear in the map, so on a fixed ``h x w`` grid it is one real
``N x N`` matrix (``N = h * w``), ``K = W^H diag(mask) W`` with ``W`` the orthonormal 2-D
DFT matrix (:func:`low_pass_operator`, the dense reference). ``K`` is low-rank: in the real
Fourier basis ``V`` (orthonormal cosines and sines of the grid, :func:`real_fourier_basis`)
it is ``V diag(mask) V^T``, so only the bins where the mask is non-zero contribute (25 of
576 on a 24 x 24 grid at cutoff 0.25). :class:`FrequencySplit` applies it to token-layout
features (``B x N x C``, the layout the model works in) as two thin matrix products
``U (m * (U^T x))`` with ``U`` those columns of ``V`` (or, when the mask is mostly 1, the
same for the high band ``1 - mask``): the dense operator's numbers (tested) at a fraction of
its cost (on a 24 x 24 grid with 1024 channels about 20x fewer operations than the dense
``576 x 576`` product), without transposing the features, and fast on any device. The mask
enters as a differentiable weight, which is how a learnable cutoff gets its gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Largest possible radius (the corner of the spectrum of an even-sized grid).
CORNER_RADIUS = math.sqrt(2.0)


def _axis_freqs(n: int, *, half: bool, device: torch.device) -> torch.Tensor:
    """Frequencies of one axis in units of Nyquist (|f| <= 1), FFT (unshifted) order."""
    freqs = torch.fft.rfftfreq(n, device=device) if half else torch.fft.fftfreq(n, device=device)
    return freqs.abs() * 2.0


def radius_grid(h: int, w: int, *, centred: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised radial frequency of every bin of an ``h x w`` spectrum, shape ``(h, w)``.

    ``centred=True`` puts the DC term in the middle (``fftshift`` layout), for display;
    ``centred=False`` is the layout of ``torch.fft.fft2``.
    """
    device = torch.device(device)
    fy = _axis_freqs(h, half=False, device=device)
    fx = _axis_freqs(w, half=False, device=device)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return torch.fft.fftshift(radius) if centred else radius


def _mask_from_radius(radius: torch.Tensor, cutoff: float | torch.Tensor, soft_edge: float) -> torch.Tensor:
    """Low-pass mask values for the given radii (see the module docstring)."""
    if soft_edge <= 0:
        if isinstance(cutoff, torch.Tensor):
            return (radius < cutoff).to(radius.dtype)
        return (radius < float(cutoff)).to(radius.dtype)
    # Position inside the ramp: 0 at r - s (mask 1) ... 1 at r (mask 0).
    t = ((radius - (cutoff - soft_edge)) / soft_edge).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def low_pass_mask(
    h: int,
    w: int,
    cutoff: float | torch.Tensor,
    soft_edge: float = 0.0,
    *,
    centred: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ``(h, w)`` radial low-pass mask, centred (``fftshift``) by default for display."""
    _check_args(cutoff, soft_edge)
    return _mask_from_radius(radius_grid(h, w, centred=centred, device=device), cutoff, soft_edge)


def _check_args(cutoff: float | torch.Tensor, soft_edge: float) -> None:
    if not isinstance(cutoff, torch.Tensor) and (not math.isfinite(cutoff) or cutoff < 0):
        raise ValueError(f"frequency cutoff must be a finite number >= 0 (ratio of the Nyquist radius), got {cutoff}")
    if not math.isfinite(soft_edge) or soft_edge < 0:
        raise ValueError(f"frequency soft_edge must be a finite number >= 0, got {soft_edge}")


def frequency_split(
    feats: torch.Tensor, cutoff: float | torch.Tensor, soft_edge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``feats`` (B x C x h x w) into ``(F_low, F_high)`` with ``F_low + F_high == F``.

    ``cutoff`` is a ratio of the Nyquist radius (a tensor cutoff keeps the autograd graph,
    which is how a learnable cutoff gets its gradient through a soft edge). The FFT runs
    in float32 (and under no autocast: FFTs have no bf16 kernels); both parts are returned
    in float32.
    """
    if feats.ndim != 4:
        raise ValueError(f"frequency_split expects B x C x h x w feature maps, got shape {tuple(feats.shape)}")
    _check_args(cutoff, soft_edge)
    h, w = feats.shape[-2:]
    x = feats.float()
    device = x.device
    with torch.autocast(device_type=device.type, enabled=False):
        fy = _axis_freqs(h, half=False, device=device)
        fx = _axis_freqs(w, half=True, device=device)
        radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
        mask = _mask_from_radius(radius, cutoff, soft_edge)
        spectrum = torch.fft.rfft2(x, norm="ortho")
        low = torch.fft.irfft2(spectrum * mask, s=(h, w), norm="ortho")
    return low, x - low


def _dft_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Orthonormal 1-D DFT matrix, complex128: ``X = W @ x``."""
    k = torch.arange(n, device=device, dtype=torch.float64)
    return torch.polar(torch.full((n, n), 1.0 / math.sqrt(n), dtype=torch.float64, device=device),
                       -2.0 * math.pi * torch.outer(k, k) / n)


def low_pass_operator(
    h: int,
    w: int,
    cutoff: float | torch.Tensor,
    soft_edge: float = 0.0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The real ``N x N`` matrix ``K`` with ``low_tokens = K @ tokens`` for tokens in row-major grid order.

    Built in double precision from the DFT matrix and the (unshifted) mask; differentiable
    in a tensor ``cutoff``.
    """
    _check_args(cutoff, soft_edge)
    device = torch.device(device)
    mask = _mask_from_radius(radius_grid(h, w, centred=False, device=device).double(), cutoff, soft_edge)
    dft = torch.kron(_dft_matrix(h, device), _dft_matrix(w, device))
    operator = (dft.conj().T * mask.flatten()) @ dft
    return operator.real.to(dtype)


def real_fourier_basis(h: int, w: int, *, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, radius)``: an orthonormal real basis of the ``h x w`` grid's frequencies and each column's radius.

    ``V`` is ``N x N`` float64 (tokens in row-major grid order). A pair of conjugate bins
    ``k, -k`` gives the columns ``sqrt(2) Re(a_k)`` and ``sqrt(2) Im(a_k)`` (``a_k`` the
    bin's complex DFT vector), a self-conjugate bin (DC, Nyquist) its real vector. The mask
    is the same on ``k`` and ``-k`` (it depends on ``|fy|, |fx|`` only), so
    ``low_pass_operator == V diag(mask(radius)) V^T``.
    """
    device = torch.device(device)
    # Rows of the 2-D DFT matrix are the bins; the synthesis vectors are their conjugates.
    synth = torch.kron(_dft_matrix(h, device), _dft_matrix(w, device)).conj()
    ky, kx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    idx = (ky * w + kx).flatten()
    conj = (((-ky) % h) * w + (-kx) % w).flatten()
    self_conj, first = idx == conj, idx < conj
    radius = radius_grid(h, w, centred=False, device=device).double().flatten()
    root2 = math.sqrt(2.0)
    basis = torch.cat(
        [synth[self_conj].real, root2 * synth[first].real, root2 * synth[first].imag]
    ).T.contiguous()
    radii = torch.cat([radius[self_conj], radius[first], radius[first]])
    return basis, radii


class FrequencySplit(nn.Module):
    """The frequency split as a module for token-layout features, optionally with a learnable cutoff.

    ``forward(tokens, grid)`` takes ``B x N x C`` tokens of an ``h x w`` grid and returns
    ``(low, high)`` with ``low + high == tokens``. It applies the low-rank form of the
    low-pass matrix (module docstring); the factors of a fixed cutoff are built once per grid
    and device and kept (a small cache on the instance). :meth:`operator` gives the dense
    matrix, the reference the factors are tested against.

    A learnable cutoff is stored as an unconstrained logit ``c`` with
    ``cutoff = max_cutoff * sigmoid(c)``, ``max_cutoff = sqrt(2) + soft_edge``, so it can
    travel the whole useful range (from "all high" to "all low") and never leaves it. A
    gradient only reaches it through frequencies inside the soft ramp, so a learnable cutoff
    needs ``soft_edge > 0`` (wide enough to hold some frequency bins of the grid: bins are
    ``2 / h`` apart).
    """

    def __init__(self, cutoff: float = 0.25, soft_edge: float = 0.0, learnable: bool = False) -> None:
        super().__init__()
        _check_args(cutoff, soft_edge)
        self.soft_edge = float(soft_edge)
        self.learnable = learnable
        self.max_cutoff = CORNER_RADIUS + self.soft_edge
        self._operators: dict[tuple[int, int, str], torch.Tensor] = {}
        self._bases: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._factors: dict[tuple[int, int, str], tuple[bool, torch.Tensor, torch.Tensor]] = {}
        if learnable:
            if soft_edge <= 0:
                raise ValueError("a learnable frequency cutoff needs soft_edge > 0 (a hard mask has no gradient)")
            frac = min(max(cutoff / self.max_cutoff, 1e-4), 1 - 1e-4)
            self.cutoff_logit = nn.Parameter(torch.tensor(math.log(frac / (1 - frac))))
        else:
            self.fixed_cutoff = float(cutoff)

    def cutoff(self) -> torch.Tensor | float:
        """The current cutoff (a 0-d tensor when learnable)."""
        if self.learnable:
            return self.max_cutoff * torch.sigmoid(self.cutoff_logit.double())
        return self.fixed_cutoff

    def operator(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The dense float32 low-pass matrix for ``grid`` (rebuilt every call when the cutoff is learnable)."""
        if self.learnable:
            return low_pass_operator(*grid, self.cutoff(), self.soft_edge, device=device)
        key = (grid[0], grid[1], str(device))
        if key not in self._operators:
            # A normal tensor even when first built while scoring, so training can use it later.
            with torch.inference_mode(False), torch.no_grad():
                self._operators[key] = low_pass_operator(*grid, self.fixed_cutoff, self.soft_edge, device=device)
        return self._operators[key]

    def factors(self, grid: tuple[int, int], device: torch.device) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """``(filters_low, U, weight)``: the band is ``U @ (weight[:, None] * (U.T @ x))``, float32.

        ``filters_low``: the band is the low part (columns where the mask is non-zero), else
        the high part (columns where it is below 1), whichever needs fewer columns. Cached
        for a fixed cutoff; a learnable one keeps the weights in its autograd graph.
        """
        key = (grid[0], grid[1], str(device))
        if not self.learnable and key in self._factors:
            return self._factors[key]
        with torch.inference_mode(False):
            if key not in self._bases:
                with torch.no_grad():
                    self._bases[key] = real_fourier_basis(*grid, device=device)
            basis, radii = self._bases[key]
            mask = _mask_from_radius(radii, self.cutoff(), self.soft_edge)
            low_cols, high_cols = mask > 0, mask < 1
            filters_low = int(low_cols.sum()) <= int(high_cols.sum())
            cols = low_cols if filters_low else high_cols
            weight = (mask if filters_low else 1.0 - mask)[cols]
            out = (filters_low, basis[:, cols].float().contiguous(), weight.float())
        if not self.learnable:
            self._factors[key] = out
        return out

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)`` float32 token parts of ``tokens`` (B x h*w x C)."""
        if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"FrequencySplit expects B x {grid[0] * grid[1]} x C tokens, got {tuple(tokens.shape)}")
        x = tokens.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            filters_low, basis, weight = self.factors(grid, x.device)
            band = torch.matmul(basis, weight[:, None] * torch.matmul(basis.T, x))
            low = band if filters_low else x - band
        return low, x - low

    def extra_repr(self) -> str:
        cutoff = self.cutoff()
        cutoff = float(cutoff.detach()) if isinstance(cutoff, torch.Tensor) else cutoff
        return f"cutoff={cutoff:.4g}, soft_edge={self.soft_edge}, learnable={self.learnable}"
