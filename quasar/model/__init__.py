"""One dense decoder for Qwen3 / OpenPangu-Embedded / Qwen2 / Llama, and checkpoint loading."""
from .args import ModelArgs
from .decoder import Transformer

__all__ = ["ModelArgs", "Transformer"]
