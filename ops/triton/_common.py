"""Small @triton.jit helpers shared by the kernel modules (rounding, dtype casts)."""
from __future__ import annotations

import torch
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

def default_options():
    """The kernel options when a caller passes none: quasar.config.KernelConfig's defaults
    (runtime.kernels; the CUDA backend passes its own, environment overrides included)."""
    global _DEFAULT
    if _DEFAULT is None:
        from quasar.config import KernelConfig
        _DEFAULT = KernelConfig()
    return _DEFAULT


_DEFAULT = None

# Programmatic dependent launch (Hopper+): each kernel is launched with launch_pdl and starts with
# pdl_prologue, so its launch and set-up overlap the tail of the kernel before it in the stream
# (and in a CUDA graph, which keeps the programmatic edges). Option `pdl`: auto (on where the
# device is sm_90+), on (without asking the device: the sm_90 compile check), off.
_PDL: dict = {}


def pdl(device, opts=None) -> bool:
    mode = (opts or default_options()).pdl
    if INTERPRETED or mode == "off":
        return False
    if mode == "on":
        return True
    device = torch.device(device)
    if device.type != "cuda":
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _PDL:
        _PDL[key] = torch.cuda.get_device_capability(key) >= (9, 0)
    return _PDL[key]


def pdl_kw(device, opts=None) -> dict:
    """Launch keywords: the PDL constexpr of the kernel, and Triton's launch_pdl option."""
    return {"PDL": True, "launch_pdl": True} if pdl(device, opts) else {"PDL": False}


# Work before the wait (option `early_loads`): a kernel may read, before pdl_prologue, what no
# kernel of the step writes (weights; the KV slots below the chunk's positions). Per kind of
# kernel: "gemm_q" the GEMMs on 8-bit activations (w8a8-int8, w8a8-fp8), "gemm_f" those on float
# activations (w8a16, dense), "attention". Measured in the step on an H100 (BENCHMARKS.md): on for
# gemm_q and attention (W8A8 verify 4.14 -> 4.00 ms); never for gemm_f, whose bf16 weight tile held
# across the wait made the bf16 decode step ~1.5% slower.
EARLY_KINDS = {"gemm_q": True, "gemm_f": False, "attention": True}


def early_loads(kind: str, opts=None) -> bool:
    return (opts or default_options()).early_loads and EARLY_KINDS[kind]


# Option `ptx_dequant`: the weight dequantizations written in inline PTX on the GPU (the int4
# GEMMs' _chunk_asm*, the w8a16 GEMM's _i8_pairs), or Triton's own lowering of the same arithmetic
# (what the interpreter always runs).
def ptx_dequant(opts=None) -> bool:
    return (opts or default_options()).ptx_dequant and not INTERPRETED


# Option `prefetch`: L2 prefetch before the PDL wait: a GEMM issues prefetch.global.L2 for the first
# weight block of its program before griddepcontrol.wait, so that its HBM reads overlap the
# previous kernel's tail and the first loads after the wait hit L2. A hint only: no registers are
# held across the wait and no result changes. Measured in the step on an H100 (BENCHMARKS.md).
def prefetch(opts=None) -> int:
    """Weight blocks per program prefetched into L2 (before prefetch_blocks' rounding)."""
    return int((opts or default_options()).prefetch)


def prefetch_blocks(blocks: int, limit: int | None = None) -> int:
    """The NPF constexpr of a GEMM launch: `blocks` rounded down to a power of two, 0 when it
    exceeds `limit` (the blocks of a row) or under the interpreter (the prefetch is PTX)."""
    if INTERPRETED or blocks <= 0:
        return 0
    blocks = 1 << (int(blocks).bit_length() - 1)
    return blocks if limit is None or blocks <= limit else 0


@triton.jit
def prefetch_l2(ptrs):
    """prefetch.global.L2 of the 128-byte line at each pointer (a hint; nothing waits for it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """Wait until the previous kernel's writes are visible (griddepcontrol.wait), then let the next
    kernel start launching. Every kernel launched with launch_pdl must call this before it touches
    global memory: nothing it reads or writes may race with the kernel before it."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


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
    if INTERP and DT == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DT)
    return y


@triton.jit
def gemm_epilogue(acc, offs_m, offs_n, m_mask, n_mask, xs_ptr, s_ptr, b_ptr, out_ptr,
                  stride_om, stride_on, HAS_XS: tl.constexpr, HAS_WS: tl.constexpr,
                  HAS_BIAS: tl.constexpr, INTERP: tl.constexpr):
    """acc[BN, BM] (the transposed output tile) -> out[m, n] = cast((acc * xs[m]) * ws[n] + b[n]),
    in the reference's order of fp32 operations."""
    a = acc.to(tl.float32)
    if HAS_XS:
        a = a * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
    if HAS_WS:
        a = a * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    if HAS_BIAS:
        a = a + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    ODT: tl.constexpr = out_ptr.dtype.element_ty
    ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(ptrs, to_dtype(a, ODT, INTERP), mask=m_mask[None, :] & n_mask[:, None])


@triton.jit
def gemm_finish(acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_k, split_k, ws_ptr, cnt_ptr,
                xs_ptr, s_ptr, b_ptr, out_ptr, stride_om, stride_on,
                SPLIT: tl.constexpr, HAS_XS: tl.constexpr, HAS_WS: tl.constexpr,
                HAS_BIAS: tl.constexpr, INTERP: tl.constexpr):
    """Split-K in one launch: with SPLIT every program stores its partial tile in its own
    workspace slot ws[pid_k, m, n] (no zero-fill needed), then takes a ticket on the tile's
    arrival counter; the last of the split_k programs to arrive sums the slots in a fixed order
    (so the result is deterministic, and exact for int32 partials), runs the epilogue and resets
    the counter to zero for the next launch."""
    if SPLIT:
        mask = m_mask[None, :] & n_mask[:, None]
        slot = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(slot + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == split_k - 1:
            total = tl.load(slot, mask=mask, other=0, cache_modifier=".cg")
            for s in range(1, split_k):
                total += tl.load(slot + s * M * N, mask=mask, other=0, cache_modifier=".cg")
            gemm_epilogue(total, offs_m, offs_n, m_mask, n_mask, xs_ptr, s_ptr, b_ptr, out_ptr,
                          stride_om, stride_on, HAS_XS, HAS_WS, HAS_BIAS, INTERP)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        gemm_epilogue(acc, offs_m, offs_n, m_mask, n_mask, xs_ptr, s_ptr, b_ptr, out_ptr,
                      stride_om, stride_on, HAS_XS, HAS_WS, HAS_BIAS, INTERP)
