"""w4a16: int4 weights in groups of `group_size` along K (default 128; -1 = per channel),
symmetric or asymmetric (zero points), activations in the model dtype."""
from __future__ import annotations

from quasar.errors import ConfigError
from . import rtn
from .format import QuantizedWeight
from .linear import QuantLinear


class W4A16Linear(QuantLinear):
    scheme = "w4a16"
    weight_bits = 4

    @classmethod
    def quantize(cls, w, qcfg):
        gs = qcfg.group_size
        if gs != -1 and w.shape[1] % gs:
            raise ConfigError(
                f"verifier.group_size {gs} does not divide the in-features {w.shape[1]} of a layer; "
                f"use a divisor of it or -1 (per channel)")
        return rtn.int4(w, gs, symmetric=qcfg.symmetric, hadamard=qcfg.hadamard)

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.bits == 4
