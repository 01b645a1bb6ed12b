"""What a quantization scheme is, and how a layer picks the kernel that runs it.

A scheme is one module in quasar/quant/ holding one `Scheme` subclass: its name (and aliases),
its weight format and RTN quantizer, its reference GEMM (the arithmetic every kernel is tested
against), and per backend an ordered list of `Kernel`s. A layer takes the first kernel of its
backend's list whose `can_implement(shape, dtype, device, weight)` says yes, as vLLM's
`choose_mp_linear_kernel` does; when none can, the error lists every kernel's reason. The
registry (`quasar.quant.SCHEMES`) is the only list of scheme names: the config's choices, the CLI
help, the backends' capability answers, the benchmarks and the README table come from it.

Kernels reach hardware only through the backend object they are built with (`backend.triton`
for the CUDA backend's Triton package, `backend.tnpu` for torch_npu, ...), never through an import
of their own, so this module and every scheme module import on any machine.
"""
from __future__ import annotations

import weakref
from typing import Any, ClassVar, Optional

import torch

from quasar.errors import ConfigError, UnsupportedError
from quasar.ops.types import QActivation, QuantizedWeight


class Kernel:
    """One implementation of a scheme's GEMM on one backend."""
    name: ClassVar[str]
    tuning_kind: ClassVar[Optional[str]] = None   # its launch table in ops/triton/tuning (tunable kernels)

    def __init__(self, backend, scheme: type["Scheme"]):
        self.backend, self.scheme = backend, scheme

    def can_implement(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                      weight: Any = None) -> tuple[bool, str]:
        """(ok, reason): whether this kernel runs an [N, K] = `shape` layer with activations in
        `dtype` on `device` (and, when given, these canonical weights) on this machine now."""
        return True, ""

    def prepare(self, weight):
        """The canonical weight (QuantizedWeight, or a dense tensor) -> this kernel's layout, once."""
        return weight

    def apply(self, x, w, bias: Optional[torch.Tensor], config=None) -> torch.Tensor:
        """x[M, K] (or a QActivation of the scheme's act_qtype) -> y[M, N]. config: a launch
        configuration that overrides the tuned one (kernels with a tuning_kind; the sweeps)."""
        raise NotImplementedError

    # helpers shared by kernels
    def shared(self, layout: str, qw, fn):
        """fn(qw), computed once per (canonical weight object, layout) on this backend: two schemes
        that run the same codes (QSpec's w4a16 / w4a4) share one prepared copy."""
        return self.backend.prepared(layout, qw, fn)

    def activation(self, x, qtype: str, w) -> QActivation:
        """x as a per-token `qtype` activation (rotated first for Hadamard weights), or x itself
        when a fused norm already quantized it."""
        if isinstance(x, QActivation):
            if x.qtype != qtype:
                raise ValueError(f"activation quantized as {x.qtype}, the GEMM needs {qtype}")
            return x
        return self.backend.quantize_per_token(rows(rotated(x, w)), qtype)


class ReferenceKernel(Kernel):
    """The scheme's reference GEMM itself (the CPU backend's kernel for every scheme)."""
    name = "reference"

    def prepare(self, weight):
        return self.scheme.reference_prepare(weight)

    def apply(self, x, w, bias, config=None):
        return self.scheme.reference_gemm(x, w, bias)


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def rotated(x: torch.Tensor, w) -> torch.Tensor:
    if not getattr(w, "hadamard", False):
        return x
    from .hadamard import rotate
    return rotate(x)


class Scheme:
    """A quantization scheme: subclass per module, register in quasar/quant/__init__.py."""
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    weights: ClassVar[str] = ""          # the weight format, for docs and help
    activations: ClassVar[str] = ""      # the activation format
    weight_bits: ClassVar[int] = 16
    act_qtype: ClassVar[Optional[str]] = None   # per-token activation type its GEMM consumes
    grouped: ClassVar[bool] = False      # whether verifier.group_size applies
    kernels: ClassVar[dict[str, tuple[type[Kernel], ...]]] = {}
    unsupported: ClassVar[dict[str, str]] = {}  # backend -> why it has no kernel (and what to use)

    @classmethod
    def quantize(cls, w: torch.Tensor, qcfg) -> QuantizedWeight | torch.Tensor:
        """RTN from a float weight[N, K] (qcfg: quasar.config.VerifierConfig)."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, w) -> bool:
        """Whether this scheme runs these canonical weights as they are (no requantization)."""
        return False

    @classmethod
    def check_weight(cls, w) -> None:
        """Raise ConfigError when the canonical weights cannot run in this scheme."""
        if not cls.accepts(w):
            raise ConfigError(f"{cls.name} cannot run weights of format {weight_format(w)}")

    @classmethod
    def reference_gemm(cls, x, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The definition: y = x @ dequant(w).T + bias, in this scheme's arithmetic."""
        raise NotImplementedError

    @classmethod
    def reference_prepare(cls, w):
        """What the reference kernel caches once per weight (default: nothing)."""
        return w

    @classmethod
    def backends(cls) -> tuple[str, ...]:
        """The backends that declare a kernel for this scheme (whether one runs here: Backend.supports)."""
        return tuple(b for b, ks in cls.kernels.items() if ks)

    @classmethod
    def choose_kernel(cls, backend, shape: tuple[int, int], dtype: torch.dtype, weight: Any = None) -> Kernel:
        reasons = []
        for kcls in cls.kernels.get(backend.name, ()):
            kernel = kcls(backend, cls)
            ok, why = kernel.can_implement(tuple(shape), dtype, backend.device, weight)
            if ok:
                return kernel
            reasons.append(f"{kcls.name}: {why}")
        others = [b for b in cls.backends() if b != backend.name]
        if reasons:
            what = "; ".join(reasons)
        elif backend.name in cls.unsupported:
            what = f"unsupported on {backend.name}: {cls.unsupported[backend.name]}"
        else:
            what = "it declares no kernel for this backend"
        raise UnsupportedError(
            f"quantization scheme {cls.name!r} cannot run on the {backend.name} backend for a "
            f"{shape[0]}x{shape[1]} layer in {str(dtype).replace('torch.', '')} ({what}); backends "
            f"with {cls.name} kernels: {', '.join(others) or 'none'}")

    @classmethod
    def layer(cls, backend, weight, bias: Optional[torch.Tensor], dtype: torch.dtype):
        from .linear import QuantLinear
        return QuantLinear(cls, backend, weight, bias, dtype)


def weight_format(w) -> str:
    if isinstance(w, QuantizedWeight):
        kind = "fp8" if w.is_fp8 else f"int{w.bits}"
        g = "per channel" if w.group_size == -1 else f"group {w.group_size}"
        return f"{kind} {g}, {'symmetric' if w.zero is None else 'asymmetric'}" + (
            ", hadamard" if w.hadamard else "")
    return f"dense {str(getattr(w, 'dtype', type(w).__name__)).replace('torch.', '')}"


class PreparedCache:
    """prepared(layout, qw, fn): one prepared object per (canonical weight object, layout)."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, layout: str, qw, fn):
        key = (layout, id(qw))
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is qw:
            return hit[1]
        out = fn(qw)
        try:
            ref = weakref.ref(qw)
        except TypeError:          # a plain tensor subclass without weakref support: no sharing
            return out
        self._cache[key] = (ref, out)
        weakref.finalize(qw, self._cache.pop, key, None)
        return out
