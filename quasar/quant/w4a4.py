"""w4a4 (QSpec's draft mode): int4 symmetric per-channel weights x per-token dynamic int4
activations. With `hadamard`, a block Hadamard rotation is folded into the weights and applied
online to the activations, which keeps W4A4 usable. The same codes also run as w4a16."""
from __future__ import annotations

from quasar.errors import ConfigError
from . import rtn
from .format import QuantizedWeight
from .linear import QuantLinear


class W4A4Linear(QuantLinear):
    scheme = "w4a4"
    act_qtype = "int4"
    weight_bits = 4

    def __init__(self, backend, weight, bias, dtype):
        if weight.group_size != -1 or weight.zero is not None:
            raise ConfigError(
                "w4a4 needs symmetric per-channel int4 weights (verifier.group_size: -1, "
                f"verifier.symmetric: true); got group_size={weight.group_size}, "
                f"symmetric={weight.zero is None}")
        super().__init__(backend, weight, bias, dtype)

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.int4(w, -1, symmetric=True, hadamard=qcfg.hadamard)

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.bits == 4 and w.group_size == -1 and w.zero is None
