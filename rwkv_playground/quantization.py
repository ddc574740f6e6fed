"""int8 weights: one scale per output row (symmetric absmax), quantized block of rows by block.

    W[n, k] ~= q[n, k] * scale[n],   q in [-127, 127],   scale[n] = max_k |W[n, k]| / 127

Why per-row absmax (and not ChatRWKV's fp16i8 row+column min/max): a row's scale multiplies its
dot product once, y[n] = scale[n] * (q[n, :] . x), so the fused step reads one byte per weight and
does nothing else per weight, and every SIMD loader stays a sign extension. Measured quality is in
benchmarks/README.md (demo model held-out loss, top-1 agreement on the 169M shape).
"""

from __future__ import annotations

from typing import Callable

import torch

QMAX = 127
# rows converted to float32 at a time: at most this many floats (4 MB) exist at once, whatever
# the matrix (a 14B model's FFN matrix is 105M weights), so loading peaks near the int8 model
BLOCK_FLOATS = 1 << 20


def quantize_rows(weight: torch.Tensor, release: Callable[[torch.Tensor], None] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype, may be memory-mapped) -> (q int8 [N, K], scale float32 [N]).
    An all-zero row gets scale 1 (its q is 0); a NaN or infinite weight gives a non-finite scale.
    release(rows) is called on each block of `weight` once it is read (checkpoint.release_file_pages:
    a memory-mapped file's pages need not stay resident while the rest is converted)."""
    if weight.dim() != 2:
        raise ValueError("quantize_rows takes a 2-D weight")
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    rows = max(1, BLOCK_FLOATS // max(1, K))
    for start in range(0, N, rows):
        source = weight[start:start + rows]
        block = source.to(torch.float32, copy=True)                           # [r, K], never the input
        absmax = torch.maximum(block.amax(dim=1), -block.amin(dim=1))         # [r] (no |block| copy)
        if release is not None:
            release(source)
        s = torch.where(absmax == 0, torch.ones_like(absmax), absmax / QMAX)  # NaN stays NaN
        block.div_(s[:, None]).round_().clamp_(-QMAX, QMAX)
        q[start:start + rows] = block.to(torch.int8)
        scale[start:start + rows] = s
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The float matrix an int8 weight stands for (the reference the kernels are tested against)."""
    return (q.to(torch.float32) * scale[:, None].float()).to(dtype)
