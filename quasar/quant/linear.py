"""The quantized linear: holds a backend-prepared weight and calls its backend's GEMM.

One subclass per scheme (one file each in quasar/quant/). A layer may also carry a *draft*
scheme that runs the same canonical weights another way (QSpec: the int4 weights run as w4a4
while drafting and as w4a16 while verifying); `set_mode(model, "draft" | "verify")` flips every
layer at once. Model code never branches on hardware or scheme.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from quasar.errors import UnsupportedError
from .format import QActivation, QuantizedWeight


class QuantLinear(nn.Module):
    scheme: ClassVar[str]
    act_qtype: ClassVar[Optional[str]] = None   # per-token activation type the GEMM consumes
    weight_bits: ClassVar[int] = 16

    def __init__(self, backend, weight, bias: Optional[torch.Tensor], dtype: torch.dtype):
        super().__init__()
        backend.check_scheme(self.scheme)
        self.backend = backend
        self.canonical_format = _fmt(weight)
        n, k = weight.shape
        self.in_features, self.out_features = k, n
        self.hadamard = getattr(weight, "hadamard", False)
        self.weight = backend.prepare_weight(self.scheme, weight)
        self.bias = None if bias is None else bias.to(device=backend.device, dtype=dtype)
        self.dtype = dtype
        self.draft: Optional[QuantLinear] = None
        self.mode = "verify"

    @classmethod
    def quantize(cls, w: torch.Tensor, qcfg) -> QuantizedWeight | torch.Tensor:
        """RTN from a float weight[N, K] (qcfg: quasar.config.VerifierConfig)."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, w) -> bool:
        """Whether this scheme can run these canonical weights as they are (no requantization)."""
        return False

    @property
    def fused_act_qtype(self) -> Optional[str]:
        """What the preceding op may hand over pre-quantized (None: a plain tensor)."""
        active = self.draft if (self.mode == "draft" and self.draft is not None) else self
        return None if active.hadamard else active.act_qtype

    def forward(self, x):
        if self.mode == "draft" and self.draft is not None:
            return self.draft(x)
        shape = x.shape
        if not isinstance(x, QActivation):
            x = x.reshape(-1, shape[-1])
        y = self.backend.gemm(self.scheme, x, self.weight, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, scheme={self.scheme}" + (
            f", draft={self.draft.scheme}" if self.draft is not None else "")


def _fmt(w) -> tuple:
    if isinstance(w, QuantizedWeight):
        return (w.bits, w.group_size, w.zero is not None, w.is_fp8, w.hadamard)
    return ("dense", str(w.dtype))


def scheme_class(name: str) -> type[QuantLinear]:
    from . import SCHEMES
    if name not in SCHEMES:
        raise UnsupportedError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def set_mode(model: nn.Module, mode: str) -> None:
    """Run every quantized linear of `model` in its verify scheme or its draft scheme."""
    model.mode = mode
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.mode = mode
