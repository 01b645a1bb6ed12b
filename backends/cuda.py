"""CUDA backend: Triton kernels (quasar.ops.triton) for the fused norm / activation quantization,
the attention prologue (q/k norm, RoPE, KV-cache write in one launch) and decode / verify
attention, on the dense or the paged KV cache; torch SDPA (the reference) for prefill attention;
CUDA graphs for the decode / draft / verify steps (`graph_runner` ->
quasar.backends.cuda_graphs.GraphRunner; the attention kernel reads the visible length from the
positions tensor, so one capture with kv_len = the whole cache serves every context length).
The GEMMs are the kernels each scheme lists for "cuda" (quasar/quant/): cuBLAS (or the
weight-streaming kernel where a tuned table says so) for unquantized layers, the Triton int8 /
fp8 / int4 weight-streaming kernels for the quantized ones.

Kernel options (quasar.config.KernelConfig, `runtime.kernels`) are given at construction and
passed to every launch: pdl, prefetch, early_loads, ptx_dequant, tuning.

CPU mode for CI: with TRITON_INTERPRET=1 in the environment (or CudaBackend.create(interpret=True))
the backend is built on the CPU and every Triton kernel runs under Triton's interpreter, so the
whole model goes through this backend's code paths on CPU tensors. FP8 is not offered there (it
needs FP8 tensor cores; its GEMM kernel is still checked under the interpreter in
tests/test_triton_kernels.py).

Prepared weights (by the schemes' kernels): int8 / fp8 codes [N, K_pad] (gemm_int8.Int8Weight,
shared by w8a8-int8 and w8a16), int4 packed [K_pad/256, N, 32] (gemm_int4.Int4Weight, shared by
w4a16 and w4a4: QSpec's one set of codes exists once).
"""
from __future__ import annotations

import torch

from quasar.errors import UnsupportedError, require
from quasar.ops import reference as R
from .base import Backend

FP8_NOTE = ("FP8 W8A8 needs FP8 tensor cores (compute capability >= 8.9, Ada / Hopper); use w8a8-int8 "
            "(same weight bytes) or w4a16")


class CudaBackend(Backend):
    name = "cuda"
    dtypes = (torch.bfloat16, torch.float16, torch.float32)

    def __init__(self, device: torch.device, options=None, interpret: bool = False):
        super().__init__(device, options)
        require("triton", "cuda", "the cuda backend (Triton kernels)")
        from quasar.ops.triton import kernels
        self.interpret = interpret
        self.triton = kernels(interpret)        # the kernel package, compiled or interpreted
        self.kernels = self.triton              # (older name)

    @classmethod
    def create(cls, options=None, device: str = "cuda", interpret: bool | None = None) -> "CudaBackend":
        from quasar.ops.triton import env_interpret
        interp = env_interpret() if interpret is None else bool(interpret)
        if interp:
            return cls(torch.device("cpu"), options, interpret=True)
        if not torch.cuda.is_available():
            raise UnsupportedError(
                "the cuda backend needs a CUDA GPU and none is visible; use device cpu, or set "
                "TRITON_INTERPRET=1 to run the CUDA backend's Triton kernels on the CPU (slow; CI)")
        dev = torch.device(device)
        if dev.type != "cuda":
            raise UnsupportedError(f"the cuda backend runs on cuda devices, not {device!r}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return cls(dev, options, interpret=False)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    # ------------------------------------------------------------------ what kernels ask
    def fp8_support(self) -> tuple[bool, str]:
        if self.interpret:
            return False, ("the Triton interpreter (CPU mode) has no FP8 tensor cores; " + FP8_NOTE)
        cc = torch.cuda.get_device_capability(self.device)
        if cc < (8, 9):
            return False, f"{torch.cuda.get_device_name(self.device)} is sm_{cc[0]}{cc[1]}; " + FP8_NOTE
        return True, ""

    def float_activation(self, dtype) -> tuple[bool, str]:
        if dtype in self.dtypes:
            return True, ""
        return False, f"activations must be bf16, fp16 or fp32, got {dtype}"

    def tuned(self, kind: str, m: int, n: int, k: int):
        return self.triton.tuning.tuned(kind, m, n, k, self.device, self.options)

    def _fp8_gate(self, qtype, op: str) -> None:
        if qtype == "fp8":
            ok, why = self.fp8_support()
            if not ok:
                raise UnsupportedError(f"{op} with fp8 on the cuda backend: {why}")

    # ------------------------------------------------------------------ the op contract
    def quantize_per_token(self, x, qtype):
        self._fp8_gate(qtype, "quantize_per_token")
        return self.triton.norm_quant.quantize_per_token(x, qtype, opts=self.options)

    def rms_norm(self, x, weight, eps):
        return self.triton.norm_quant.rms_norm(x, weight, eps, opts=self.options)

    def rms_norm_quant(self, x, weight, eps, qtype):
        self._fp8_gate(qtype, "rms_norm_quant")
        return self.triton.norm_quant.rms_norm_quant(x, weight, eps, qtype, opts=self.options)

    def add_rms_norm(self, x, delta, weight, eps, qtype=None):
        self._fp8_gate(qtype, "add_rms_norm")
        return self.triton.norm_quant.add_rms_norm(x, delta, weight, eps, qtype, opts=self.options)

    def silu_mul(self, x):
        return self.triton.norm_quant.silu_mul(x, opts=self.options)

    def silu_mul_quant(self, x, qtype):
        self._fp8_gate(qtype, "silu_mul_quant")
        return self.triton.norm_quant.silu_mul_quant(x, qtype, opts=self.options)

    def rope(self, x, cos, sin):
        return R.rope(x, cos, sin)

    def kv_write(self, cache, layer, k, v, positions):
        return R.kv_write(cache, layer, k, v, positions)

    def rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer):
        return self.triton.rope.rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer,
                                              opts=self.options)

    def attention(self, q, cache, layer, positions, kv_len, mask=None):
        attn = self.triton.attention
        if attn.supports(q, cache):
            return attn.attention(q, cache, layer, positions, kv_len, mask, opts=self.options)
        return R.attention(q, cache, layer, positions, kv_len, mask)   # prefill: torch SDPA

    # the paged KV cache (the batched runtime): the same two Triton kernels, through slot mapping
    # and block tables
    def paged_kv_write(self, cache, layer, k, v, slot_mapping):
        return R.paged_kv_write(cache, layer, k, v, slot_mapping)

    def paged_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        return self.triton.rope.paged_rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer,
                                                    opts=self.options)

    def paged_attention(self, q, cache, layer, ctx):
        attn = self.triton.attention
        if attn.supports_paged(q, cache, ctx):     # uniform chunks (decode, verify)
            return attn.paged_attention(q, cache, layer, ctx, opts=self.options)
        # ragged / prefill chunks: every sequence in one masked SDPA call (torch's fused kernels)
        return R.batched_paged_attention(q, cache, layer, ctx)

    # QuantSpec's hierarchical KV cache: norms / RoPE by this backend's kernels, the full-precision
    # write and the quantization of completed blocks in torch; attention by the Triton kernel for
    # uniform steps (decode, draft, verify), the reference for ragged ones (prefill)
    def hier_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        return R.paged_rope_kv_write_with(self.rms_norm, self.rope, R.hier_kv_write)(
            qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer)

    def hier_attention(self, q, cache, layer, ctx, upper_only):
        hk = self.triton.hier_attention
        if hk.supports(q, cache, ctx):
            return hk.hier_attention(q, cache, layer, ctx, upper_only, opts=self.options)
        return R.hier_attention(q, cache, layer, ctx, upper_only)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free_memory(self) -> int:
        if self.device.type != "cuda":
            return super().free_memory()
        return torch.cuda.mem_get_info(self.device)[0]

    def paged_graph_runner(self, runner, buckets, chunk_lengths, modes, tree_lengths=()):
        if self.device.type != "cuda":
            return None
        from .cuda_graphs import PagedGraphRunner
        return PagedGraphRunner(runner, buckets, chunk_lengths, modes, tree_lengths)

    def graph_runner(self, model, cache, chunk_lengths, modes):
        if self.device.type != "cuda":
            return None
        from .cuda_graphs import GraphRunner
        return GraphRunner(model, cache, chunk_lengths, modes)


def make_backend(device: str = "cuda", interpret: bool | None = None, options=None) -> CudaBackend:
    """A CUDA backend outside the registry's cache (tests; interpret=True: the CPU twin)."""
    return CudaBackend.create(options, device, interpret)
