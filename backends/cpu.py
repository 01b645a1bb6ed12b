"""CPU backend: the reference implementation of every op (quasar.ops.reference) and the
definition the other backends are tested against. Prepared weights are the canonical formats
themselves. Used by CI, and by anyone without an accelerator."""
from __future__ import annotations

from dataclasses import replace

import torch

from quasar.backends import Backend
from quasar.ops.reference import REFERENCE_OPS

SCHEMES = ("bf16", "w8a8-int8", "w8a8-fp8", "w8a16", "w4a16", "w4a4")


def _identity(w):
    return w


def _dequantized_once(w):
    """Weight-only schemes: keep the canonical codes and cache the fp32 matrix (prepare once)."""
    w = replace(w)
    w._dense = w.dequantize(torch.float32)
    return w


def _codes_as_f32(w):
    """Integer-activation schemes: cache the codes as fp32 once (exact; see _int_gemm)."""
    w = replace(w)
    w._codes_f32 = w.codes.float()
    return w


_PREPARE = {"w8a16": _dequantized_once, "w4a16": _dequantized_once,
            "w8a8-int8": _codes_as_f32, "w4a4": _codes_as_f32}


def make_backend(device: str = "cpu") -> Backend:
    return Backend(
        name="cpu", device=torch.device(device), ops=dict(REFERENCE_OPS),
        prepare={s: _PREPARE.get(s, _identity) for s in SCHEMES},
        schemes=SCHEMES,
        dtypes=(torch.float32, torch.bfloat16, torch.float16))
