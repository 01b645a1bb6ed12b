"""The Backend base class: one method per op of the contract (quasar.ops), one subclass per device.

A subclass implements the ops its device has; calling one it lacks raises UnsupportedError naming
the op, the backend and the backends that implement it. GEMMs are not backend methods: each
quantization scheme lists its kernels per backend (quasar/quant/scheme.py) and a layer picks one
at load time; the backend supplies what those kernels need (its device, its kernel options, a
cache that shares one prepared copy of a weight between schemes, and hardware primitives).

Capabilities are answered by one method, `supports(scheme, dtype)`, which asks the scheme's kernels
for this backend whether they can run here now (not a table that may disagree with the machine).
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from quasar.errors import UnsupportedError
from quasar.ops import OPS
from quasar.quant.scheme import PreparedCache


class Backend:
    name: ClassVar[str]
    dtypes: ClassVar[tuple] = (torch.float32, torch.bfloat16, torch.float16)
    attention_modes: ClassVar[tuple] = ("prefill", "decode", "verify")

    def __init__(self, device: torch.device, options=None):
        from quasar.config import KernelConfig
        self.device = torch.device(device)
        self.options = options if options is not None else KernelConfig()
        self._prepared = PreparedCache()

    # ------------------------------------------------------------------ device defaults
    def default_dtype(self) -> torch.dtype:
        """What `dtype: auto` means here."""
        return torch.bfloat16

    def synchronize(self) -> None:
        """Wait for the device (timing splits); a no-op where ops are synchronous."""

    # `runtime.kv_cache_memory: auto` takes at most this much (the host's memory is shared)
    auto_kv_cap_gib: ClassVar[float] = float("inf")

    def free_memory(self) -> int:
        """Bytes free for the KV cache now (the host's available memory by default)."""
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def graph_runner(self, model, cache, chunk_lengths, modes):
        """A captured-step runner (CUDA graphs) wrapping `model`, or None: steps run eagerly."""
        return None

    def paged_graph_runner(self, runner, buckets, chunk_lengths, modes, tree_lengths=()):
        """Captured uniform steps of a paged ModelRunner (CUDA graphs per batch bucket x chunk
        length x mode, and per batch bucket x tree size x mode for draft-tree steps of
        `tree_lengths` nodes), or None: steps run eagerly. A captured runner returns None for a
        step it has no graph for (a tree step never replays a chain graph)."""
        return None

    # ------------------------------------------------------------------ capabilities
    def supports(self, scheme, dtype: Optional[torch.dtype] = None,
                 shape: tuple[int, int] = (256, 256)) -> tuple[bool, str]:
        """(ok, reason): whether some kernel of `scheme` runs a `shape` layer on this backend now."""
        from quasar import quant
        s = quant.get(scheme) if isinstance(scheme, str) else scheme
        dtype = dtype or self.default_dtype()
        try:
            s.choose_kernel(self, shape, dtype)
        except UnsupportedError as e:
            return False, str(e)
        return True, ""

    @property
    def schemes(self) -> tuple[str, ...]:
        """The registered schemes that run on this backend now."""
        from quasar import quant
        return tuple(n for n in quant.SCHEMES if self.supports(n)[0])

    def check_scheme(self, scheme) -> None:
        ok, why = self.supports(scheme)
        if not ok:
            raise UnsupportedError(why + f"; the {self.name} backend runs {', '.join(self.schemes)}")

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            raise UnsupportedError(
                f"dtype {dtype} is not supported by the {self.name} backend; use one of "
                + ", ".join(str(d).replace("torch.", "") for d in self.dtypes))

    # ------------------------------------------------------------------ weights (for kernels)
    def prepared(self, layout: str, qw, fn):
        return self._prepared.get(layout, qw, fn)

    def on_device(self, qw):
        return qw if qw.codes.device == self.device else qw.to(self.device)

    def prepare_weight(self, scheme, weight, dtype: Optional[torch.dtype] = None) -> Any:
        """The canonical weight prepared by the kernel this backend picks for it (tests, benchmarks;
        a model's layers do this through QuantLinear)."""
        from quasar import quant
        s = quant.get(scheme) if isinstance(scheme, str) else scheme
        s.check_weight(weight)
        return s.choose_kernel(self, tuple(weight.shape), dtype or self.default_dtype(), weight).prepare(weight)

    def gemm(self, scheme, x, w, bias=None) -> torch.Tensor:
        """One GEMM through the kernel this backend picks (tests, benchmarks)."""
        from quasar import quant
        s = quant.get(scheme) if isinstance(scheme, str) else scheme
        return s.choose_kernel(self, tuple(w.shape), x.dtype, None).apply(x, w, bias)

    # ------------------------------------------------------------------ the op contract
    def _missing(self, op: str):
        from quasar.backends import implementing
        raise UnsupportedError(
            f"op {op!r} is not implemented by the {self.name} backend; backends that implement it: "
            f"{', '.join(implementing(op)) or 'none'}")

    def rms_norm(self, x, weight, eps):
        self._missing("rms_norm")

    def rms_norm_quant(self, x, weight, eps, qtype):
        self._missing("rms_norm_quant")

    def add_rms_norm(self, x, delta, weight, eps, qtype=None):
        self._missing("add_rms_norm")

    def rope(self, x, cos, sin):
        self._missing("rope")

    def quantize_per_token(self, x, qtype):
        self._missing("quantize_per_token")

    def silu_mul(self, x):
        self._missing("silu_mul")

    def silu_mul_quant(self, x, qtype):
        self._missing("silu_mul_quant")

    def kv_write(self, cache, layer, k, v, positions):
        self._missing("kv_write")

    def rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer):
        self._missing("rope_kv_write")

    def attention(self, q, cache, layer, positions, kv_len, mask=None):
        self._missing("attention")

    def paged_kv_write(self, cache, layer, k, v, slot_mapping):
        self._missing("paged_kv_write")

    def paged_attention(self, q, cache, layer, ctx):
        self._missing("paged_attention")

    def paged_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        self._missing("paged_rope_kv_write")

    def hier_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        self._missing("hier_rope_kv_write")

    def hier_attention(self, q, cache, layer, ctx, upper_only):
        self._missing("hier_attention")

    # ------------------------------------------------------------------ KV representations
    # representation -> why this backend cannot run it and what to use instead
    kv_unsupported: ClassVar[dict] = {}

    def check_kv(self, representation: str) -> None:
        why = self.kv_unsupported.get(representation)
        if why:
            raise UnsupportedError(f"kv_cache.representation {representation!r} is not supported on {self.name}: {why}")


CONTRACT_METHODS = tuple(op for op in OPS if op != "gemm")
