"""The two kernels issue 14 made cheaper, timed against what they replaced.

- frequency split: the dense ``N x N`` low-pass matrix (``FrequencySplit.operator``) against
  the low-rank factors the model runs (``FrequencySplit.forward``), on ViT-L-14-336's
  24 x 24 grid with 1024 channels; the maximum difference is printed too;
- FSAM window attention on the same grid with 7 x 7 windows; on CUDA, under the flash
  kernel alone (``sdpa_kernel(FLASH_ATTENTION)``), which fails if the call needs a mask.

    python benchmarks/bench_kernels.py                 # CPU
    python benchmarks/bench_kernels.py --device cuda   # bf16 autocast for FSAM, fp32 split

Last line: one JSON object with the timings (ms per batch) and the speed-up.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from timing import timed  # the benchmarks' helper, beside this script

from harmoniad.model.frequency import FrequencySplit
from harmoniad.model.fsam import WindowAttention
from harmoniad.runtime.device import autocast, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    grid = (args.grid, args.grid)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    x = torch.randn(args.batch, args.grid**2, args.channels, device=device)
    split = FrequencySplit(0.25)
    dense = split.operator(grid, device)
    with torch.no_grad():
        low, _ = split(x, grid)
        diff = float((low - dense @ x).abs().max())

        def run_dense() -> None:
            torch.matmul(dense, x)
            sync()

        def run_fast() -> None:
            split(x, grid)
            sync()

        run_dense(), run_fast()
        t_dense, _ = timed(run_dense, args.repeats)
        t_fast, _ = timed(run_fast, args.repeats)
    print(f"frequency split {args.batch} x {grid} x {args.channels}: dense {t_dense * 1e3:.2f} ms, "
          f"low-rank {t_fast * 1e3:.2f} ms ({t_dense / t_fast:.1f}x), max |diff| {diff:.2e}")

    attn = WindowAttention(256, heads=4, window=7).to(device).eval()
    tokens = torch.randn(args.batch, args.grid**2, 256, device=device)
    fused = "n/a (CPU)"
    with torch.no_grad(), autocast(device):
        def run_attn() -> None:
            attn(tokens, grid)
            sync()

        run_attn()
        t_attn, _ = timed(run_attn, args.repeats)
        if device.type == "cuda":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                run_attn()
                t_flash, _ = timed(run_attn, args.repeats)
            fused = f"flash kernel only: {t_flash * 1e3:.2f} ms"
    print(f"FSAM window attention {args.batch} x {grid}, 7 x 7 windows: {t_attn * 1e3:.2f} ms; {fused}")
    print(json.dumps({"device": str(device), "split_dense_ms": round(t_dense * 1e3, 3),
                      "split_low_rank_ms": round(t_fast * 1e3, 3), "split_speedup": round(t_dense / t_fast, 2),
                      "split_max_abs_diff": diff, "fsam_attention_ms": round(t_attn * 1e3, 3)}))


if __name__ == "__main__":
    main()
