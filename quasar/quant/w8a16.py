"""w8a16: int8 symmetric per-channel weights, activations in the model dtype."""
from __future__ import annotations

from . import rtn
from .reference import dense_once, weight_only
from .scheme import ReferenceKernel, Scheme, rotated, rows
from .w8a8_int8 import NpuQuantMatmul, TritonInt8, int8_per_channel


class TritonW8A16(TritonInt8):
    """The int8 weight-streaming kernel on float activations (int8 -> float in PTX on the GPU)."""
    name = "triton_w8a16"
    tuning_kind = "int8_a16"

    def can_implement(self, shape, dtype, device, weight=None):
        return self.backend.float_activation(dtype)

    def apply(self, x, w, bias, config=None):
        be = self.backend
        lead = x.shape[:-1]
        return be.triton.gemm_int8.gemm_w8a16(rows(rotated(x, w)), w, bias, config=config,
                                              opts=be.options).view(*lead, w.n)


class NpuWeightQuantInt8(NpuQuantMatmul):
    """npu_weight_quant_batchmatmul on int8 weights [K, N]."""
    name = "npu_weight_quant_batchmatmul"

    def apply(self, x, w, bias, config=None):
        return self.backend.weight_quant_matmul(rotated(x, w), w, bias)


class W8A16(Scheme):
    name = "w8a16"
    weights = "int8 per channel, symmetric"
    activations = "model dtype"
    weight_bits = 8
    kernels = {"cpu": (ReferenceKernel,), "cuda": (TritonW8A16,), "npu": (NpuWeightQuantInt8,)}

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.int8_per_channel(w, hadamard=getattr(qcfg, "hadamard", False))

    @classmethod
    def accepts(cls, w):
        return int8_per_channel(w)

    @classmethod
    def reference_prepare(cls, w):
        return dense_once(w)

    @classmethod
    def reference_gemm(cls, x, w, bias=None):
        return weight_only(x, w, bias)
