"""w4a4 (QSpec's draft mode): int4 symmetric per-channel weights x per-token dynamic int4
activations. With `hadamard`, a block Hadamard rotation is folded into the weights and applied
online to the activations, which keeps W4A4 usable. The same codes also run as w4a16."""
from __future__ import annotations

from quasar.errors import ConfigError
from . import rtn
from .format import QuantizedWeight
from .reference import as_activation, codes_once, int_gemm
from .scheme import ReferenceKernel, Scheme
from .w4a16 import TritonInt4


class TritonInt4Int4(TritonInt4):
    """The int4 kernel with int4 activations: int8-dot on codes built in registers."""
    name = "triton_w4a4"
    tuning_kind = "int4_a4"

    def can_implement(self, shape, dtype, device, weight=None):
        return True, ""

    def apply(self, x, w, bias, config=None):
        be = self.backend
        lead = x.shape[:-1]
        return be.triton.gemm_int4.gemm_w4a4(self.activation(x, "int4", w), w, bias, config=config,
                                             opts=be.options).view(*lead, w.n)


class W4A4(Scheme):
    name = "w4a4"
    weights = "int4 per channel, symmetric (+Hadamard)"
    activations = "int4 per token, dynamic"
    weight_bits = 4
    act_qtype = "int4"
    kernels = {"cpu": (ReferenceKernel,), "cuda": (TritonInt4Int4,)}
    unsupported = {"npu": (
        "npu_quant_matmul takes int4 operands only as int32-packed words, and its documented dtype "
        "combinations pair a per-token activation scale with int4 x int4 only in the per-group form "
        "(2-D weight scale + float16 offset); Quasar's w4a4 (per-channel int4 weights x per-token "
        "int4 activations, QSpec's draft mode) has no documented mapping. Alternatives: w4a16 (the "
        "same int4 weights, npu_weight_quant_batchmatmul) or w8a8-int8 on npu, or w4a4 on cpu/cuda")}

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.int4(w, -1, symmetric=True, hadamard=qcfg.hadamard)

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.bits == 4 and w.group_size == -1 and w.zero is None

    @classmethod
    def check_weight(cls, w):
        if not cls.accepts(w):
            raise ConfigError(
                "w4a4 needs symmetric per-channel int4 weights (verifier.group_size: -1, "
                f"verifier.symmetric: true); got group_size={getattr(w, 'group_size', None)}, "
                f"symmetric={getattr(w, 'zero', None) is None}")

    @classmethod
    def reference_prepare(cls, w):
        return codes_once(w)

    @classmethod
    def reference_gemm(cls, x, w, bias=None):
        return int_gemm(as_activation(x, "int4", w), w, bias)
