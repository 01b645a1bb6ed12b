"""w4a16: int4 weights in groups of `group_size` along K (`auto`: 128 where it divides K, else 64
or 32, else per channel; -1 = per channel), symmetric or asymmetric (zero points), activations
in the model dtype."""
from __future__ import annotations

import logging
from quasar.errors import ConfigError
from . import rtn
from .format import QuantizedWeight
from .reference import dense_once, weight_only
from .scheme import Kernel, ReferenceKernel, Scheme, rotated, rows

log = logging.getLogger("quasar")
AUTO_GROUPS = (128, 64, 32)
_LOGGED: set = set()


def group_size_for(group_size, k: int) -> int:
    """verifier.group_size for a layer of in-features k: `auto` -> the largest of 128, 64, 32
    that divides k, else -1 (per channel), logged once per choice. An explicit size must divide k."""
    if group_size == "auto":
        g = next((g for g in AUTO_GROUPS if k % g == 0), -1)
        if (k, g) not in _LOGGED:
            _LOGGED.add((k, g))
            log.info("verifier.group_size auto: in-features %d -> %s", k,
                     "per channel" if g == -1 else f"groups of {g}")
        return g
    gs = int(group_size)
    if gs != -1 and k % gs:
        ok = [g for g in AUTO_GROUPS if k % g == 0]
        raise ConfigError(
            f"verifier.group_size {gs} does not divide the in-features {k} of a layer; use auto, -1 "
            f"(per channel){' or ' + ', '.join(map(str, ok)) if ok else ''}")
    return gs


def int4_cuda_ok(weight) -> tuple[bool, str]:
    if weight is None or weight.group_size == -1 or weight.group_size % 32 == 0:
        return True, ""
    return False, (f"the Triton int4 kernels need a group size that is a multiple of 32 (or -1), "
                   f"got {weight.group_size}")


class TritonInt4(Kernel):
    """int4 codes packed 8 per int32 in 256-wide K blocks, dequantized in registers
    (ops/triton/gemm_int4.py; PTX dequantization on the GPU)."""
    name = "triton_int4"
    tuning_kind = "int4_a16"

    def can_implement(self, shape, dtype, device, weight=None):
        ok, why = self.backend.float_activation(dtype)
        return (ok, why) if not ok else int4_cuda_ok(weight)

    def prepare(self, qw):
        be = self.backend
        return self.shared("int4", qw, lambda q: be.triton.gemm_int4.pack_int4(be.on_device(q)))

    def apply(self, x, w, bias, config=None):
        be = self.backend
        lead = x.shape[:-1]
        return be.triton.gemm_int4.gemm_w4a16(rows(rotated(x, w)), w, bias, config=config,
                                              opts=be.options).view(*lead, w.n)


class NpuWeightQuantInt4(Kernel):
    """npu_weight_quant_batchmatmul on npu_convert_weight_to_int4pack weights."""
    name = "npu_weight_quant_batchmatmul"

    def can_implement(self, shape, dtype, device, weight=None):
        ok, why = self.backend.check_k(shape[1])
        if ok and shape[0] % 8:
            return False, (f"out-features {shape[0]} is not a multiple of 8, which "
                           "npu_convert_weight_to_int4pack needs (8 int4 per int32 along N)")
        return ok, why

    def prepare(self, qw):
        return self.backend.prepare_int4(qw)

    def apply(self, x, w, bias, config=None):
        return self.backend.weight_quant_matmul(rotated(x, w), w, bias)


class W4A16(Scheme):
    name = "w4a16"
    weights = "int4, groups along K (auto / 32 / 64 / 128 / -1), sym or asym"
    activations = "model dtype"
    weight_bits = 4
    grouped = True
    kernels = {"cpu": (ReferenceKernel,), "cuda": (TritonInt4,), "npu": (NpuWeightQuantInt4,)}

    @classmethod
    def quantize(cls, w, qcfg):
        gs = group_size_for(qcfg.group_size, w.shape[1])
        return rtn.int4(w, gs, symmetric=qcfg.symmetric, hadamard=qcfg.hadamard)

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.bits == 4

    @classmethod
    def reference_prepare(cls, w):
        return dense_once(w)

    @classmethod
    def reference_gemm(cls, x, w, bias=None):
        return weight_only(x, w, bias)
