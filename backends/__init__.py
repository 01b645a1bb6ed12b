"""Backend registry: `quasar.backends.get(device)` returns the backend for cpu, cuda or npu.

A backend is one module that builds a `Backend`: an implementation per op of the contract
(`quasar.ops`), the weight preparation per scheme, and a declaration of its capabilities. Asking
a backend for an op or a scheme it lacks raises `UnsupportedError` naming the op or scheme, the
backend, and the backends that do support it. There is never a silent fallback.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from quasar.errors import UnsupportedError
from quasar.ops import OPS

DEVICES = ("cpu", "cuda", "npu")
_MODULES = {"cpu": "quasar.backends.cpu", "cuda": "quasar.backends.cuda", "npu": "quasar.backends.npu"}
_CACHE: dict[str, "Backend"] = {}

# What each backend declares (kept here as plain data so that an error on one backend can list
# the others without importing them: importing the NPU backend needs torch_npu).
CAPABILITIES: dict[str, dict[str, tuple]] = {}


@dataclass
class Backend:
    name: str                     # "cpu" | "cuda" | "npu"
    device: torch.device
    ops: dict[str, Callable] = field(default_factory=dict)
    prepare: dict[str, Callable] = field(default_factory=dict)   # scheme -> prepare_weight fn
    schemes: tuple = ()
    dtypes: tuple = ()
    attention_modes: tuple = ("prefill", "decode", "verify")
    notes: dict[str, str] = field(default_factory=dict)         # scheme -> why it is unsupported
    # make_runner(model, chunk_lengths, modes) -> callable(ids, positions, mode) replaying captured
    # steps (CUDA graphs); None = the backend runs steps eagerly.
    make_runner: Optional[Callable] = None

    def __getattr__(self, name: str) -> Callable:
        # backend.rms_norm(...) etc.; an op the contract has but this backend lacks is an error.
        if name.startswith("__"):
            raise AttributeError(name)
        ops = self.__dict__.get("ops", {})
        if name in ops:
            return ops[name]
        if name in OPS:
            others = [d for d, caps in CAPABILITIES.items() if name in caps.get("ops", ())]
            raise UnsupportedError(
                f"op {name!r} is not implemented by the {self.name} backend; "
                f"backends that implement it: {', '.join(others) or 'none'}")
        raise AttributeError(name)

    def check_scheme(self, scheme: str) -> None:
        if scheme not in self.schemes:
            others = [d for d, caps in CAPABILITIES.items() if scheme in caps.get("schemes", ())
                      and d != self.name]
            why = self.notes.get(scheme)
            raise UnsupportedError(
                f"quantization scheme {scheme!r} is not supported by the {self.name} backend"
                + (f" ({why})" if why else "")
                + f"; it supports {', '.join(self.schemes)}; backends that support {scheme!r}: "
                + (", ".join(others) or "none"))

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            raise UnsupportedError(
                f"dtype {dtype} is not supported by the {self.name} backend; use one of "
                + ", ".join(str(d).replace("torch.", "") for d in self.dtypes))

    def prepare_weight(self, scheme: str, qw: Any) -> Any:
        """Repack a canonical weight (quasar.quant.format) once into this backend's layout."""
        self.check_scheme(scheme)
        return self.prepare[scheme](qw)

    def gemm(self, scheme: str, x, w, bias=None):
        return self.ops["gemm_" + scheme.replace("-", "_")](x, w, bias)


def register_capabilities(name: str, ops, schemes) -> None:
    CAPABILITIES[name] = {"ops": tuple(ops), "schemes": tuple(schemes)}


# Static declarations (see the module docstrings of each backend for the why).
register_capabilities("cpu", OPS.keys(), ("bf16", "w8a8-int8", "w8a8-fp8", "w8a16", "w4a16", "w4a4"))
register_capabilities("cuda", OPS.keys(), ("bf16", "w8a8-int8", "w8a8-fp8", "w8a16", "w4a16", "w4a4"))
register_capabilities("npu", [o for o in OPS if o not in ("gemm_w8a8_fp8", "gemm_w4a4")],
                      ("bf16", "w8a8-int8", "w8a16", "w4a16"))


def available() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.insert(0, "cuda")
    if _npu_available():
        out.insert(0 if "cuda" not in out else 1, "npu")
    return out


def _npu_available() -> bool:
    npu = getattr(torch, "npu", None)  # present only once torch_npu has been imported by the user
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:
        return False


def resolve_device(device: str) -> str:
    """'auto' -> cuda if present, else npu if torch_npu is loaded and sees a device, else cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _npu_available():
            return "npu"
        return "cpu"
    if device not in DEVICES:
        raise UnsupportedError(f"unknown device {device!r}; choose one of auto, {', '.join(DEVICES)}")
    return device


def get(device: str = "auto") -> Backend:
    name = resolve_device(device)
    if name not in _CACHE:
        module = importlib.import_module(_MODULES[name])
        _CACHE[name] = module.make_backend()
    return _CACHE[name]


def reset(name: str | None = None) -> None:
    """Forget constructed backends (tests swap torch_npu for its emulation)."""
    if name is None:
        _CACHE.clear()
    else:
        _CACHE.pop(name, None)
