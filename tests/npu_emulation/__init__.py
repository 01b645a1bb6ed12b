"""Test helpers: run the NPU backend against the emulated ``torch_npu`` (or the real one).

    with emulated_torch_npu():          # sys.modules["torch_npu"] = the fake, for this block only
        be = quasar.backends.get("npu")  # a Backend named "npu" whose device is the CPU

    use_real_torch_npu()                 # True when QUASAR_NPU_REAL=1: tests then import the real
                                         # torch_npu and run on the Ascend device instead

The fake lives in ``tests/npu_emulation/torch_npu/`` and is loaded under the module name
``torch_npu`` only inside ``emulated_torch_npu``; ``tests/`` itself never puts it on sys.path, so
nothing else can import it by accident.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

FAKE_DIR = Path(__file__).resolve().parent / "torch_npu"
REAL_ENV = "QUASAR_NPU_REAL"


def use_real_torch_npu() -> bool:
    """QUASAR_NPU_REAL=1: the suite targets the real torch_npu on an Ascend machine."""
    return os.environ.get(REAL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def load_fake():
    """A fresh module object of the emulation, named ``torch_npu`` (not registered anywhere)."""
    spec = importlib.util.spec_from_file_location("torch_npu", FAKE_DIR / "__init__.py",
                                                  submodule_search_locations=[str(FAKE_DIR)])
    mod = importlib.util.module_from_spec(spec)
    saved = {k: sys.modules[k] for k in list(sys.modules) if k == "torch_npu" or k.startswith("torch_npu.")}
    sys.modules["torch_npu"] = mod          # so that `from . import npu` resolves during exec
    try:
        spec.loader.exec_module(mod)
    finally:
        for k in [k for k in sys.modules if k == "torch_npu" or k.startswith("torch_npu.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return mod


@contextlib.contextmanager
def emulated_torch_npu():
    """Install the emulation as ``torch_npu`` (and reset the cached npu backend) for the block."""
    from quasar import backends
    saved = {k: sys.modules[k] for k in list(sys.modules) if k == "torch_npu" or k.startswith("torch_npu.")}
    fake = load_fake()
    for k in saved:
        del sys.modules[k]
    sys.modules["torch_npu"] = fake
    sys.modules["torch_npu.npu"] = fake.npu
    backends.reset("npu")
    try:
        yield fake
    finally:
        for k in [k for k in sys.modules if k == "torch_npu" or k.startswith("torch_npu.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        backends.reset("npu")


@contextlib.contextmanager
def torch_npu_missing():
    """Make ``import torch_npu`` fail (as on a machine without it) for the block."""
    from quasar import backends
    saved = {k: sys.modules[k] for k in list(sys.modules) if k == "torch_npu" or k.startswith("torch_npu.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["torch_npu"] = None         # `import torch_npu` -> ImportError
    backends.reset("npu")
    try:
        yield
    finally:
        del sys.modules["torch_npu"]
        sys.modules.update(saved)
        backends.reset("npu")
