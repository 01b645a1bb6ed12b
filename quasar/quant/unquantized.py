"""unquantized: weights and activations in the model dtype (bf16 / fp16 / fp32). YAML also
accepts the old name `bf16`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import by_row
from .scheme import Kernel, ReferenceKernel, Scheme, rows


class CublasDense(Kernel):
    """cuBLAS (F.linear), except at the few-row shapes where this GPU's tuned table measured the
    weight-streaming Triton kernel faster (kind "bf16"; none on GPUs without a table)."""
    name = "cublas"
    tuning_kind = "bf16"       # the streaming kernel's table: where it beat cuBLAS

    def apply(self, x, w, bias, config=None):
        be = self.backend
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (not be.interpret and 0 < m <= 16 and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
                and w.is_contiguous() and w.shape[1] % 256 == 0
                and be.tuned(self.tuning_kind, m, w.shape[0], w.shape[1]) is not None):
            return self.stream(x, w, bias)
        return F.linear(x, w, bias)

    def stream(self, x, w, bias=None, config=None):
        """The dense weight through the weight-streaming Triton kernel."""
        be = self.backend
        y = be.triton.gemm_int8.gemm_dense_stream(rows(x), w, bias, config=config, opts=be.options)
        return y.view(*x.shape[:-1], w.shape[0])


class NpuDense(Kernel):
    name = "npu_linear"

    def apply(self, x, w, bias, config=None):
        return F.linear(x, w, bias)


class Unquantized(Scheme):
    name = "unquantized"
    aliases = ("bf16",)
    weights = "model dtype"
    activations = "model dtype"
    weight_bits = 16
    kernels = {"cpu": (ReferenceKernel,), "cuda": (CublasDense,), "npu": (NpuDense,)}

    @classmethod
    def quantize(cls, w, qcfg):
        return w

    @classmethod
    def accepts(cls, w):
        return isinstance(w, torch.Tensor)

    @classmethod
    def reference_gemm(cls, x, w, bias=None):
        return by_row(lambda r: F.linear(r, w, bias), x)
