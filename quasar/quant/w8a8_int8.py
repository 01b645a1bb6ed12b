"""w8a8-int8 (Quasar's W8A8_DYNAMIC): int8 symmetric per-output-channel weights, per-token
dynamic symmetric int8 activations, int32 accumulation, output in the model dtype."""
from __future__ import annotations

from . import rtn
from .format import QuantizedWeight
from .reference import as_activation, codes_once, int_gemm
from .scheme import Kernel, ReferenceKernel, Scheme


def int8_per_channel(w) -> bool:
    return isinstance(w, QuantizedWeight) and w.bits == 8 and not w.is_fp8 and w.group_size == -1 and w.zero is None


class TritonInt8(Kernel):
    """int8 x int8 -> int32 tensor-core dot, weight streaming (ops/triton/gemm_int8.py)."""
    name = "triton_int8"
    tuning_kind = "w8a8_int8"

    def prepare(self, qw):
        be = self.backend
        return self.shared("int8", qw, lambda q: be.triton.gemm_int8.pack_int8(be.on_device(q)))

    def apply(self, x, w, bias, config=None):
        be = self.backend
        lead = x.shape[:-1]
        a = self.activation(x, "int8", w)
        return be.triton.gemm_int8.gemm_w8a8_int8(a, w, bias, config=config, opts=be.options).view(*lead, w.n)


class NpuQuantMatmul(Kernel):
    """npu_dynamic_quant + npu_quant_matmul (pertoken_scale, output_dtype = the model dtype)."""
    name = "npu_quant_matmul"

    def can_implement(self, shape, dtype, device, weight=None):
        return self.backend.check_k(shape[1])

    def prepare(self, qw):
        return self.backend.prepare_int8(qw)

    def apply(self, x, w, bias, config=None):
        return self.backend.quant_matmul(self.activation(x, "int8", w), w, bias)


class W8A8Int8(Scheme):
    name = "w8a8-int8"
    weights = "int8 per channel, symmetric"
    activations = "int8 per token, dynamic"
    weight_bits = 8
    act_qtype = "int8"
    kernels = {"cpu": (ReferenceKernel,), "cuda": (TritonInt8,), "npu": (NpuQuantMatmul,)}

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.int8_per_channel(w, hadamard=getattr(qcfg, "hadamard", False))

    @classmethod
    def accepts(cls, w):
        return int8_per_channel(w)

    @classmethod
    def reference_prepare(cls, w):
        return codes_once(w)

    @classmethod
    def reference_gemm(cls, x, w, bias=None):
        return int_gemm(as_activation(x, "int8", w), w, bias)
