"""w8a8-fp8: e4m3 per-channel weights, per-token dynamic e4m3 activations (fp32 accumulation).
On CUDA this needs compute capability >= 8.9 (FP8 tensor cores; a Triton fp8 x fp8 GEMM); other
backends say so."""
from __future__ import annotations

from . import rtn
from .format import QuantizedWeight
from .linear import QuantLinear


class W8A8Fp8Linear(QuantLinear):
    scheme = "w8a8-fp8"
    act_qtype = "fp8"
    weight_bits = 8

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.fp8_per_channel(w)

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.is_fp8
