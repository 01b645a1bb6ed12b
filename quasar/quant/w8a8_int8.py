"""w8a8-int8 (Quasar's W8A8_DYNAMIC): int8 symmetric per-output-channel weights, per-token
dynamic symmetric int8 activations, int32 accumulation, output in the model dtype (bf16)."""
from __future__ import annotations

from . import rtn
from .format import QuantizedWeight
from .linear import QuantLinear


class W8A8Int8Linear(QuantLinear):
    scheme = "w8a8-int8"
    act_qtype = "int8"
    weight_bits = 8

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.int8_per_channel(w, hadamard=getattr(qcfg, "hadamard", False))

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.bits == 8 and not w.is_fp8 and w.group_size == -1 and w.zero is None
