"""The runtime: `LLM` (a deployment turned into a loaded model, tokenizer, drafter and scheduler)
and the `ModelRunner` that owns a model's step and KV cache."""
from .llm import LLM, Result, eos_ids, load_tokenizer, resolve_dtype
from .model_runner import ModelRunner

__all__ = ["LLM", "ModelRunner", "Result", "eos_ids", "load_tokenizer", "resolve_dtype"]
