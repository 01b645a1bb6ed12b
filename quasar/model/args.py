"""Model hyper-parameters, read from a checkpoint's config.json, for the supported dense families.

- llama (SmolLM2):   optional attention_bias (q, k, v, o) and mlp_bias.
- qwen2:             bias on q, k, v (not o).
- qwen3:             q_norm / k_norm (RMSNorm over head_dim, before RoPE), explicit head_dim,
                     optional attention_bias.
- OpenPangu-Embedded (PanguEmbeddedForCausalLM): the Llama layout with `bias` on q, k, v and o,
                     no q/k norm, head_dim = hidden / heads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quasar.errors import CheckpointError, UnsupportedError

FAMILIES = ("llama", "qwen2", "qwen3", "pangu_embedded")
_TYPE_ALIASES = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "PanguEmbedded": "pangu_embedded", "pangu_embedded": "pangu_embedded", "openpangu_dense": "pangu_embedded",
}
_ARCH_ALIASES = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "PanguEmbeddedForCausalLM": "pangu_embedded",
}


@dataclass
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        family = _family(cfg, source)

        def need(key):
            if key not in cfg:
                raise CheckpointError(f"{source}: missing required key {key!r} for a {family} model")
            return cfg[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        if cfg.get("use_sliding_window"):
            raise UnsupportedError(f"{source}: use_sliding_window is true; sliding-window attention "
                                   "is not supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
        theta = cfg.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            theta = 1.6e7 if family == "pangu_embedded" else 10000.0
        head_dim = cfg.get("head_dim") or hidden // heads
        args = cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5 if family == "pangu_embedded" else 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )
        if family == "llama":
            args.qkv_bias = args.o_bias = bool(cfg.get("attention_bias", False))
            args.mlp_bias = bool(cfg.get("mlp_bias", False))
        elif family == "qwen2":
            args.qkv_bias = True
        elif family == "qwen3":
            args.qk_norm = True
            args.qkv_bias = args.o_bias = bool(cfg.get("attention_bias", False))
        elif family == "pangu_embedded":
            args.qkv_bias = args.o_bias = bool(cfg.get("bias", True))
        if args.num_heads % args.num_kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads ({args.num_heads}) is not a multiple "
                                  f"of num_key_value_heads ({args.num_kv_heads})")
        return args

    @classmethod
    def from_dir(cls, path: Path) -> "ModelArgs":
        return cls.from_hf(read_config(path), str(Path(path) / "config.json"))


def read_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{f} does not exist: a model directory needs config.json")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})") from None


def _family(cfg: dict, source: str) -> str:
    mt = cfg.get("model_type")
    if mt in _TYPE_ALIASES:
        return _TYPE_ALIASES[mt]
    for arch in cfg.get("architectures") or []:
        if arch in _ARCH_ALIASES:
            return _ARCH_ALIASES[arch]
    raise UnsupportedError(
        f"{source}: model_type {mt!r} (architectures {cfg.get('architectures')}) is not supported; "
        "supported: llama, qwen2, qwen3, PanguEmbedded (PanguEmbeddedForCausalLM)")
