"""The quantized linear: a scheme, the kernel its backend chose for this layer, and the weight
that kernel prepared once.

A layer may also carry a *draft* layer that runs the same canonical weights in another scheme
(QSpec: the int4 weights run as w4a4 while drafting and as w4a16 while verifying). Which one runs is
an argument of the call (`layer(x, draft=True)`), passed down from the step's mode
(`ModelRunner.run(..., mode)`): no layer holds a mode. Model code never branches on hardware or
scheme.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quasar.ops.types import QActivation, QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, scheme, backend, weight, bias: Optional[torch.Tensor], dtype: torch.dtype):
        super().__init__()
        scheme.check_weight(weight)
        if isinstance(weight, torch.Tensor):
            weight = weight.to(device=backend.device, dtype=dtype)
        n, k = weight.shape
        self.scheme = scheme
        self.kernel = scheme.choose_kernel(backend, (n, k), dtype, weight)
        self.canonical_format = _fmt(weight)
        self.in_features, self.out_features = k, n
        self.group_size = getattr(weight, "group_size", -1)      # -1: per output channel
        self.symmetric = getattr(weight, "zero", None) is None
        self.hadamard = getattr(weight, "hadamard", False)
        self.weight = self.kernel.prepare(weight)
        self.bias = None if bias is None else bias.to(device=backend.device, dtype=dtype)
        self.dtype = dtype
        self.draft: Optional[QuantLinear] = None

    @property
    def scheme_name(self) -> str:
        return self.scheme.name

    def fused_act_qtype(self, draft: bool = False) -> Optional[str]:
        """What the preceding op may hand over pre-quantized (None: a plain tensor), in the
        verify scheme or (draft) the draft scheme."""
        active = self.draft if (draft and self.draft is not None) else self
        return None if active.hadamard else active.scheme.act_qtype

    def forward(self, x, draft: bool = False):
        if draft and self.draft is not None:
            return self.draft(x)
        shape = x.shape
        if not isinstance(x, QActivation):
            x = x.reshape(-1, shape[-1])
        y = self.kernel.apply(x, self.weight, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, scheme={self.scheme.name}, "
                f"kernel={self.kernel.name}") + (f", draft={self.draft.scheme.name}" if self.draft is not None else "")


def _fmt(w) -> tuple:
    if isinstance(w, QuantizedWeight):
        return (w.bits, w.group_size, w.zero is not None, w.is_fp8, w.hadamard)
    return ("dense", str(w.dtype))
