"""Backend registry: `quasar.backends.get(device, options)` returns the backend for cpu, cuda or npu.

A backend is a subclass of `Backend` (backends/base.py) whose methods mirror the op contract
(`quasar.ops`); one module per device. Quantized GEMMs are chosen per layer from the kernels each
scheme lists for a backend (quasar/quant/). Asking for an op, a scheme or a dtype a backend lacks
raises `UnsupportedError` naming it, the backend, and the backends that have it: never a silent
fallback. Importing a backend module imports no hardware library (triton and torch_npu are
imported when a backend is constructed).
"""
from __future__ import annotations

import importlib

import torch

from quasar.errors import UnsupportedError
from .base import CONTRACT_METHODS, Backend

DEVICES = ("cpu", "cuda", "npu")
_CLASSES = {"cpu": ("quasar.backends.cpu", "CpuBackend"), "cuda": ("quasar.backends.cuda", "CudaBackend"),
            "npu": ("quasar.backends.npu", "NpuBackend")}
_CACHE: dict[tuple, Backend] = {}


def backend_class(name: str) -> type[Backend]:
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def implementing(op: str) -> list[str]:
    """The backends whose class implements `op` (asked of the classes: no hardware is touched)."""
    return [d for d in DEVICES if getattr(backend_class(d), op, None) is not getattr(Backend, op, None)]


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


def get(device: str = "auto", options=None) -> Backend:
    """The backend for `device`, built once per (device, kernel options). options:
    quasar.config.KernelConfig (runtime.kernels); None = the defaults."""
    from quasar.config import KernelConfig
    name = resolve_device(device)
    options = (options if options is not None else KernelConfig()).with_env()   # QUASAR_* overrides
    key = (name, options)
    if key not in _CACHE:
        _CACHE[key] = backend_class(name).create(options)
    return _CACHE[key]


def reset(name: str | None = None) -> None:
    """Forget constructed backends (tests swap torch_npu for its emulation)."""
    for key in list(_CACHE):
        if name is None or key[0] == name:
            del _CACHE[key]


__all__ = ["Backend", "CONTRACT_METHODS", "DEVICES", "available", "get", "implementing", "reset",
           "resolve_device"]
