"""Triton kernels of the CUDA backend (installed as quasar.ops.triton).

One module per kernel family, each holding its @triton.jit kernels and the thin Python wrappers
that launch them:

  norm_quant.py   quantize_per_token (int8 / int4), rms_norm, rms_norm_quant, silu_mul,
                  silu_mul_quant: one program per row, fp32 math, round-half-to-even codes
  gemm_int8.py    int8 weights [N, K]: w8a8-int8 (int8 x int8 -> int32 tl.dot) and w8a16
  gemm_int4.py    int4 weights packed 8 per int32 in 256-wide K blocks: w4a16 (groups 32/64/128/
                  per channel, sym/asym) and w4a4 (int4 x int4 -> int32); both read one layout
  rope.py         the attention prologue: q/k RMSNorm, RoPE and the KV-cache write in one launch
  attention.py    flash-decoding attention over the static cache for decode / verify chunks
  hier_attention.py  the same over QuantSpec's hierarchical INT4/INT8 KV cache (planes + pool)
  tuning.py       launch configurations (heuristic + a table the benchmark fills)
  _common.py      small @triton.jit helpers shared by the kernels

Interpreter mode. Whether `triton.jit` builds a compiled kernel or an interpreted one is decided
when a kernel is decorated (TRITON_INTERPRET). `kernels(interpret)` returns the kernel package in
the requested mode: the package itself when that is how it was imported, otherwise a private copy
of it imported with TRITON_INTERPRET set accordingly. Caveat, seen with triton 3.6 on an H100:
triton's own @jit helpers (tl.zeros, ...) are built in the mode of the environment when triton
itself is imported, so on a GPU machine a process should use one mode only (the tests skip their
interpreter twins there).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

MODULES = ("_common", "tuning", "norm_quant", "rope", "gemm_int8", "gemm_int4", "attention", "hier_attention")
_COPIES: dict[bool, types.ModuleType] = {}


def env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _import_all(pkg_name: str) -> types.ModuleType:
    pkg = sys.modules[pkg_name]
    for m in MODULES:
        importlib.import_module(f"{pkg_name}.{m}")
    return pkg


def kernels(interpret: bool | None = None) -> types.ModuleType:
    """The kernel package (attributes: norm_quant, gemm_int8, gemm_int4, attention, tuning) with
    kernels built for the interpreter (interpret=True) or compiled for the GPU."""
    want = env_interpret() if interpret is None else bool(interpret)
    if want in _COPIES:
        return _COPIES[want]
    pkg = _import_all(__name__)
    if pkg._common.INTERPRETED == want:
        _COPIES[want] = pkg
        return pkg
    alias = f"{__name__}._{'interp' if want else 'compiled'}_copy"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if want else "0"
    try:
        if alias not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                alias, os.path.join(os.path.dirname(__file__), "__init__.py"),
                submodule_search_locations=[os.path.dirname(__file__)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[alias] = mod
            spec.loader.exec_module(mod)
        mod = _import_all(alias)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    if mod._common.INTERPRETED != want:
        raise RuntimeError(f"could not build the Triton kernels in {'interpreter' if want else 'compiled'} "
                           "mode (triton.knobs.runtime.interpret is pinned?)")
    _COPIES[want] = mod
    return mod
