"""Block Hadamard rotation over the last (K) dimension.

H is block-diagonal with normalized Sylvester Hadamard blocks of size b, the largest power of two
that divides K (b = K when K is a power of two). H is orthogonal and symmetric, so
x @ W.T == (x @ H) @ (W @ H).T: the rotation is folded into the weights once and applied to the
activations online. It spreads outliers across channels, which is what keeps W4A4 usable.
"""
from __future__ import annotations

import functools

import torch


def block_size(k: int) -> int:
    return k & -k   # the largest power of two dividing k


@functools.lru_cache(maxsize=16)
def _sylvester(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x[..., K] @ H, computed in fp32 (fp64 for fp64 input), returned in x.dtype.

    A Sylvester block of size b = 2^n is the Kronecker product H_a (x) H_c with a = 2^(n//2),
    c = b / a, so a row x of the block, read as an a x c matrix X (row-major), maps to
    H_a X H_c: two small matmuls (a, c <= 64 for b <= 4096) instead of one b x b (a 64 MB fp32
    matrix per call at b = 4096, which made every rotated GEMM input a large memory read)."""
    k = x.shape[-1]
    b = block_size(k)
    a = 1 << ((b.bit_length() - 1) // 2)
    c = b // a
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    ha = _sylvester(a, str(x.device)).to(ct)
    hc = ha if c == a else _sylvester(c, str(x.device)).to(ct)
    xb = x.to(ct).reshape(*x.shape[:-1], k // b, a, c)
    y = ha @ xb @ hc
    return y.reshape(x.shape).to(x.dtype)
