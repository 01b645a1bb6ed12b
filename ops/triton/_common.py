"""Small @triton.jit helpers shared by the kernel modules (rounding, dtype casts)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _probe(x):
    pass


def is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(fn, InterpretedFunction)


# Whether this copy of the kernel package was decorated for the interpreter (see __init__).
INTERPRETED = is_interpreted(_probe)


@triton.jit
def rint(x):
    """Round half to even (torch.round) for fp32 values of moderate size (|x| < 2**22), with
    floor only: exact, and identical under the interpreter and on the GPU."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def to_dtype(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """x.to(DT) with round-to-nearest-even. The interpreter's fp32 -> bf16 cast truncates, so
    there the rounding is done on the bits (NaN/inf aside, which this does not need)."""
    if INTERP:
        if DT == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DT)
    else:
        return x.to(DT)
