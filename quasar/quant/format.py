"""The canonical weight / activation formats (defined with the op contract in quasar.ops.types)."""
from quasar.ops.types import QMAX, QActivation, QuantizedWeight

__all__ = ["QMAX", "QActivation", "QuantizedWeight"]
