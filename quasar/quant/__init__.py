"""Quantization schemes: one module per scheme (its format, RTN quantizer, reference GEMM and
kernels per backend: quasar/quant/scheme.py), registered here. This registry is the only list of
scheme names in the engine.

Adding a scheme = its own module + one `register(...)` line (or a call to `register` from
anywhere, e.g. a test or a plugin).
"""
from __future__ import annotations

from quasar.errors import UnsupportedError
from .linear import QuantLinear
from .scheme import Kernel, ReferenceKernel, Scheme

SCHEMES: dict[str, type[Scheme]] = {}
ALIASES: dict[str, str] = {}


def register(scheme: type[Scheme]) -> type[Scheme]:
    if scheme.name in SCHEMES and SCHEMES[scheme.name] is not scheme:
        raise ValueError(f"scheme {scheme.name!r} is already registered")
    SCHEMES[scheme.name] = scheme
    for a in scheme.aliases:
        ALIASES[a] = scheme.name
    return scheme


def unregister(name: str) -> None:
    scheme = SCHEMES.pop(name, None)
    for a in getattr(scheme, "aliases", ()):
        ALIASES.pop(a, None)


def canonical(name: str) -> str:
    """A scheme name or alias -> the registered name (unknown names pass through)."""
    return ALIASES.get(name, name)


def get(name: str) -> type[Scheme]:
    name = canonical(name)
    if name not in SCHEMES:
        raise UnsupportedError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def names(with_aliases: bool = False) -> tuple[str, ...]:
    return tuple(SCHEMES) + (tuple(ALIASES) if with_aliases else ())


def default() -> str:
    """The unquantized scheme: what a float checkpoint runs when nothing else is asked for."""
    return next(n for n, s in SCHEMES.items() if s.weight_bits == 16 and s.act_qtype is None)


def table() -> str:
    """The markdown table of the registered schemes (README, --help)."""
    lines = ["| scheme | weights | activations | backends |", "|---|---|---|---|"]
    for s in SCHEMES.values():
        alias = f" (alias {', '.join(s.aliases)})" if s.aliases else ""
        lines.append(f"| `{s.name}`{alias} | {s.weights} | {s.activations} | {', '.join(s.backends())} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the registered schemes
from .unquantized import Unquantized  # noqa: E402
from .w4a16 import W4A16  # noqa: E402
from .w4a4 import W4A4  # noqa: E402
from .w8a16 import W8A16  # noqa: E402
from .w8a8_fp8 import W8A8Fp8  # noqa: E402
from .w8a8_int8 import W8A8Int8  # noqa: E402

register(Unquantized)
register(W8A8Int8)
register(W8A8Fp8)
register(W8A16)
register(W4A16)
register(W4A4)

DEFAULT_DRAFT = W4A4.name      # quantized_self (QSpec) drafts in this scheme unless drafter.scheme says
DEFAULT_INTERMEDIATE = W4A16.name   # hierarchical's `self` intermediate (SpecMQuant's is a W4A16 model)

__all__ = ["SCHEMES", "QuantLinear", "Scheme", "Kernel", "ReferenceKernel", "register", "get",
           "canonical", "names", "table"]
