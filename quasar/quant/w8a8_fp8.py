"""w8a8-fp8: e4m3 per-channel weights, per-token dynamic e4m3 activations, fp32 accumulation.
On CUDA it needs FP8 tensor cores (compute capability >= 8.9)."""
from __future__ import annotations

from . import rtn
from .format import QuantizedWeight
from .reference import as_activation, by_row, finish
from .scheme import Kernel, ReferenceKernel, Scheme


class TritonFp8(Kernel):
    """The int8 kernel's fp8 x fp8 variant (ops/triton/gemm_int8.py)."""
    name = "triton_fp8"

    def can_implement(self, shape, dtype, device, weight=None):
        return self.backend.fp8_support()

    def prepare(self, qw):
        be = self.backend
        if not isinstance(qw, QuantizedWeight) or not qw.is_fp8 or qw.scale.shape[1] != 1:
            from quasar.errors import UnsupportedError
            raise UnsupportedError("w8a8-fp8 needs float8_e4m3fn per-channel weights")
        return be.triton.gemm_int8.pack_fp8(be.on_device(qw))

    def apply(self, x, w, bias, config=None):
        be = self.backend
        lead = x.shape[:-1]
        return be.triton.gemm_int8.gemm_w8a8_fp8(self.activation(x, "fp8", w), w, bias, config=config,
                                                 opts=be.options).view(*lead, w.n)


class W8A8Fp8(Scheme):
    name = "w8a8-fp8"
    weights = "e4m3 per channel"
    activations = "e4m3 per token, dynamic"
    weight_bits = 8
    act_qtype = "fp8"
    kernels = {"cpu": (ReferenceKernel,), "cuda": (TritonFp8,)}
    unsupported = {"npu": (
        "torch_npu's quantized matmul takes FP8 operands only on Ascend 950; the Atlas A2/A3 "
        "(910B/910C) NPUs have no FP8 matmul. Alternatives: w8a8-int8 (Quasar's W8A8, "
        "npu_quant_matmul) or w8a16 on npu, or w8a8-fp8 on cuda (compute capability >= 8.9)")}

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.fp8_per_channel(w)

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.is_fp8

    @classmethod
    def reference_gemm(cls, x, w, bias=None):
        a = as_activation(x, "fp8", w)
        codes = w.codes.float()
        acc = by_row(lambda r: r.float() @ codes.T, a.q)
        return finish(acc * a.scale * w.scale.view(1, -1).float(), bias, a.dtype)
