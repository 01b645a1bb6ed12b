"""Quantization schemes (one file each), weight formats, RTN quantizers and checkpoint unpacking.

| scheme     | weights                         | activations           |
|------------|---------------------------------|-----------------------|
| bf16       | model dtype                     | model dtype           |
| w8a8-int8  | int8 per channel, symmetric     | int8 per token, dyn.  |
| w8a8-fp8   | e4m3 per channel                | e4m3 per token, dyn.  |
| w8a16      | int8 per channel                | model dtype           |
| w4a16      | int4, group 128 (or -1), sym/asym | model dtype         |
| w4a4       | int4 per channel, sym (+Hadamard) | int4 per token, dyn. |
"""
from .bf16 import DenseLinear
from .linear import QuantLinear, scheme_class, set_mode
from .w4a16 import W4A16Linear
from .w4a4 import W4A4Linear
from .w8a16 import W8A16Linear
from .w8a8_fp8 import W8A8Fp8Linear
from .w8a8_int8 import W8A8Int8Linear

SCHEMES: dict[str, type[QuantLinear]] = {
    c.scheme: c for c in (DenseLinear, W8A8Int8Linear, W8A8Fp8Linear, W8A16Linear, W4A16Linear, W4A4Linear)
}

__all__ = ["SCHEMES", "QuantLinear", "scheme_class", "set_mode"]
