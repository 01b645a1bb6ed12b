"""CUDA backend: Triton kernels (quasar.ops.triton) for the quantized GEMMs, the fused
norm / activation quantization and decode / verify attention; cuBLAS for bf16 linears;
the int8 kernel's fp8 x fp8 variant for FP8 W8A8 (compute capability >= 8.9); one Triton kernel for the q/k norms,
RoPE and the KV-cache write (rope_kv_write); torch SDPA for prefill attention; CUDA graphs for the decode / draft / verify steps (make_runner ->
quasar.backends.cuda_graphs.GraphRunner; the attention kernel reads the visible length from the
positions tensor, so one capture with kv_len = the whole cache serves every context length).

CPU mode for CI: with TRITON_INTERPRET=1 in the environment (or make_backend(interpret=True)) the
backend is built on the CPU and every Triton kernel runs under Triton's interpreter, so the whole
model goes through this backend's code paths on CPU tensors. The backend does not offer FP8 there
(it needs FP8 tensor cores on a GPU; its GEMM kernel is still checked under the interpreter in
tests/test_triton_kernels.py).

Prepared weights (Backend.prepare, scheme -> fn(QuantizedWeight) -> object):
  bf16              the dense [N, K] tensor itself
  w8a8-int8, w8a16  gemm_int8.Int8Weight: codes int8 [N, K_pad] (K zero-padded to a multiple
                    of 256), scale fp32 [N]
  w4a16, w4a4       gemm_int4.Int4Weight: packed int32 [K_pad/256, N, 32] (8 codes per word,
                    nibble q + 4h of word (b, n, w) = code(n, 256 b + 64 q + 2 w + h) + 8),
                    scale fp32 [G, N],
                    zero fp32 [G, N] = 8 + zero point (or None)
  w8a8-fp8          gemm_int8.Int8Weight with float8_e4m3fn codes [N, K_pad] (K padded to 256)
The int8 layouts are shared by w8a8-int8/w8a16 and the int4 layouts by w4a16/w4a4; preparing the
same QuantizedWeight object twice (QSpec: one set of int4 codes run as w4a16 and as w4a4) returns
the same prepared object, so the packed codes exist once.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from quasar.backends import Backend
from quasar.errors import UnsupportedError
from quasar.ops import reference as R
from quasar.quant.format import QActivation, QuantizedWeight

SCHEMES = ("bf16", "w8a8-int8", "w8a8-fp8", "w8a16", "w4a16", "w4a4")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rotate(x: torch.Tensor, w) -> torch.Tensor:
    if not getattr(w, "hadamard", False):
        return x
    from quasar.quant.hadamard import rotate
    return rotate(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _shared(kind: str, fn):
    """prepare fn that returns one prepared object per (QuantizedWeight object, layout kind)."""
    cache: dict = {}

    def prepare(qw):
        key = id(qw)
        hit = cache.get(key)
        if hit is not None and hit[0]() is qw:
            return hit[1]
        out = fn(qw)
        cache[key] = (weakref.ref(qw), out)
        weakref.finalize(qw, cache.pop, key, None)
        return out

    prepare.__name__ = f"prepare_{kind}"
    prepare.cache = cache
    return prepare


def make_backend(device: str = "cuda", interpret: bool | None = None) -> Backend:
    from quasar.ops.triton import env_interpret, kernels

    interp = env_interpret() if interpret is None else bool(interpret)
    if interp:
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise UnsupportedError(
                "the cuda backend needs a CUDA GPU and none is visible; use device cpu, or set "
                "TRITON_INTERPRET=1 to run the CUDA backend's Triton kernels on the CPU (slow; CI)")
        dev = torch.device(device)
        if dev.type != "cuda":
            raise UnsupportedError(f"the cuda backend runs on cuda devices, not {device!r}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    kn = kernels(interp)
    nq, g8, g4, attn = kn.norm_quant, kn.gemm_int8, kn.gemm_int4, kn.attention

    notes: dict[str, str] = {}
    if interp:
        fp8_ok = False
        notes["w8a8-fp8"] = ("FP8 W8A8 needs FP8 tensor cores (compute capability >= 8.9), which the "
                             "Triton interpreter (CPU mode) does not offer; use w8a8-int8 (same weight "
                             "bytes) or w4a16")
    else:
        cc = torch.cuda.get_device_capability(dev)
        fp8_ok = cc >= (8, 9)
        if not fp8_ok:
            notes["w8a8-fp8"] = (f"FP8 W8A8 needs compute capability >= 8.9 (Ada / Hopper: FP8 "
                                 f"tensor cores); {torch.cuda.get_device_name(dev)} is "
                                 f"{cc[0]}.{cc[1]}; use w8a8-int8 (same weight bytes) or w4a16")
    schemes = tuple(s for s in SCHEMES if s != "w8a8-fp8" or fp8_ok)

    def _no_fp8(op: str):
        raise UnsupportedError(f"{op} with fp8 on the cuda backend: {notes['w8a8-fp8']}")

    def _on_device(qw: QuantizedWeight) -> QuantizedWeight:
        return qw if qw.codes.device == dev else qw.to(dev)

    # ------------------------------------------------------------------ activations
    def _fp8_gate(qtype, op):
        if qtype == "fp8" and not fp8_ok:
            _no_fp8(op)

    def quantize_per_token(x, qtype):
        _fp8_gate(qtype, "quantize_per_token")
        return nq.quantize_per_token(x, qtype)

    def rms_norm(x, weight, eps):
        return nq.rms_norm(x, weight, eps)

    def rms_norm_quant(x, weight, eps, qtype):
        _fp8_gate(qtype, "rms_norm_quant")
        return nq.rms_norm_quant(x, weight, eps, qtype)

    def add_rms_norm(x, delta, weight, eps, qtype=None):
        _fp8_gate(qtype, "add_rms_norm")
        return nq.add_rms_norm(x, delta, weight, eps, qtype)

    def silu_mul(x):
        return nq.silu_mul(x)

    def silu_mul_quant(x, qtype):
        _fp8_gate(qtype, "silu_mul_quant")
        return nq.silu_mul_quant(x, qtype)

    def _activation(x, qtype: str, w) -> QActivation:
        if isinstance(x, QActivation):
            if x.qtype != qtype:
                raise ValueError(f"activation quantized as {x.qtype}, the GEMM needs {qtype}")
            return x
        return quantize_per_token(_rows(_rotate(x, w)), qtype)

    def _check_act(x, scheme):
        if x.dtype not in DTYPES:
            raise UnsupportedError(f"gemm_{scheme}: activations must be bf16, fp16 or fp32, got {x.dtype}")

    # ------------------------------------------------------------------ GEMMs
    def gemm_bf16(x, w, bias=None):
        # cuBLAS, except at the few-row shapes where the tuned table for this GPU measured the
        # weight-streaming Triton kernel faster (kind "bf16"; none on GPUs without a table)
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (not interp and 0 < m <= 16 and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
                and w.is_contiguous() and w.shape[1] % 256 == 0
                and kn.tuning.tuned("bf16", m, w.shape[0], w.shape[1], x.device) is not None):
            return g8.gemm_dense_stream(_rows(x), w, bias).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, bias)

    def gemm_w8a8_int8(x, w, bias=None):
        lead = x.shape[:-1]
        return g8.gemm_w8a8_int8(_activation(x, "int8", w), w, bias).view(*lead, w.n)

    def gemm_w8a16(x, w, bias=None):
        _check_act(x, "w8a16")
        lead = x.shape[:-1]
        return g8.gemm_w8a16(_rows(_rotate(x, w)), w, bias).view(*lead, w.n)

    def gemm_w4a16(x, w, bias=None):
        _check_act(x, "w4a16")
        lead = x.shape[:-1]
        return g4.gemm_w4a16(_rows(_rotate(x, w)), w, bias).view(*lead, w.n)

    def gemm_w4a4(x, w, bias=None):
        lead = x.shape[:-1]
        return g4.gemm_w4a4(_activation(x, "int4", w), w, bias).view(*lead, w.n)

    def gemm_w8a8_fp8(x, w, bias=None):
        if not fp8_ok:
            _no_fp8("gemm_w8a8_fp8")
        lead = x.shape[:-1]
        return g8.gemm_w8a8_fp8(_activation(x, "fp8", w), w, bias).view(*lead, w.n)

    # ------------------------------------------------------------------ attention, cache, rope
    def attention(q, cache, layer, positions, kv_len, mask=None):
        if attn.supports(q, cache):
            return attn.attention(q, cache, layer, positions, kv_len, mask)
        return R.attention(q, cache, layer, positions, kv_len, mask)   # prefill: torch SDPA

    def synchronize():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # ------------------------------------------------------------------ weight preparation
    def prepare_dense(w):
        if isinstance(w, QuantizedWeight):
            raise UnsupportedError("the bf16 scheme takes a dense weight tensor, not a quantized one")
        return w.to(dev)

    int8_prep = _shared("int8", lambda qw: g8.pack_int8(_on_device(qw)))
    int4_prep = _shared("int4", lambda qw: g4.pack_int4(_on_device(qw)))

    def prepare_fp8(qw):
        if not fp8_ok:
            raise UnsupportedError(f"quantization scheme 'w8a8-fp8' on the cuda backend: {notes['w8a8-fp8']}")
        qw = _on_device(qw)
        if not qw.is_fp8 or qw.scale.shape[1] != 1:
            raise UnsupportedError("w8a8-fp8 needs float8_e4m3fn per-channel weights")
        return g8.pack_fp8(qw)

    ops = {
        "rms_norm": rms_norm, "rms_norm_quant": rms_norm_quant, "add_rms_norm": add_rms_norm, "rope": R.rope,
        "quantize_per_token": quantize_per_token, "silu_mul": silu_mul,
        "silu_mul_quant": silu_mul_quant, "gemm_bf16": gemm_bf16, "gemm_w8a8_int8": gemm_w8a8_int8,
        "gemm_w8a8_fp8": gemm_w8a8_fp8, "gemm_w8a16": gemm_w8a16, "gemm_w4a16": gemm_w4a16,
        "gemm_w4a4": gemm_w4a4, "kv_write": R.kv_write, "rope_kv_write": kn.rope.rope_kv_write,
        "attention": attention,
        "synchronize": synchronize,
    }
    prepare = {"bf16": prepare_dense, "w8a8-int8": int8_prep, "w8a16": int8_prep,
               "w4a16": int4_prep, "w4a4": int4_prep, "w8a8-fp8": prepare_fp8}
    make_runner = None
    if dev.type == "cuda":     # decode / draft / verify steps replayed from CUDA graphs
        def make_runner(model, chunk_lengths, modes=("verify",)):
            from quasar.backends.cuda_graphs import GraphRunner
            return GraphRunner(model, chunk_lengths, modes)
    be = Backend(name="cuda", device=dev, ops=ops, prepare=prepare, schemes=schemes, dtypes=DTYPES,
                 attention_modes=("prefill", "decode", "verify"), notes=notes, make_runner=make_runner)
    be.interpret = interp
    be.kernels = kn
    return be
