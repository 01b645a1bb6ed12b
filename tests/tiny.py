"""Tiny random checkpoints built with transformers' own model classes (the oracles).

    path = make_tiny(tmp_path, "qwen3", tie=False, head_dim=24)
    hf = load_hf(path)          # the transformers model, fp32, eval mode

Families: llama, qwen2, qwen3, and "pangu": OpenPangu-Embedded, written as a directory whose
config.json says PanguEmbeddedForCausalLM (bias on q/k/v/o, rope_theta 1.6e7, eps 1e-5) and
whose tensors include rotary_emb.inv_freq; its oracle is LlamaForCausalLM(attention_bias=True,
mlp_bias=False), which computes the same function.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=10000.0)


def hf_config(family: str, tie: bool = False, **over):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    kw = dict(BASE, tie_word_embeddings=tie, **over)
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "qwen3":
        kw.setdefault("head_dim", 16)
        return Qwen3Config(**kw)
    if family == "pangu":
        kw.update(rope_theta=1.6e7, rms_norm_eps=1e-5)
        kw.update(over)
        return LlamaConfig(**dict(kw, attention_bias=True, mlp_bias=False))
    raise ValueError(family)


def make_tiny(root: Path, family: str = "qwen3", tie: bool = False, seed: int = 0, std: float = 0.2,
              **over) -> Path:
    """Write a random tiny model of `family` to root/<family>… and return its directory.
    std: init scale, larger than transformers' default so logits are far from uniform."""
    from transformers import AutoModelForCausalLM
    cfg = hf_config(family, tie, **over)
    cfg.initializer_range = std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():   # non-trivial norms and biases, so a wrong one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    out = Path(root) / f"{family}-tie{int(tie)}-s{seed}-{abs(hash(tuple(sorted(over.items())))) % 10**6}"
    model.save_pretrained(str(out), safe_serialization=True)
    if family == "pangu":
        _as_pangu(out, cfg)
    return out


def _as_pangu(out: Path, cfg) -> None:
    from safetensors.torch import load_file, save_file
    c = json.loads((out / "config.json").read_text())
    for k in ("attention_bias", "mlp_bias", "rope_parameters", "rope_scaling", "model_type",
              "architectures", "head_dim", "pretraining_tp"):
        c.pop(k, None)
    c.update(architectures=["PanguEmbeddedForCausalLM"], model_type="PanguEmbedded", bias=True,
             rope_theta=1.6e7, rms_norm_eps=1e-5)
    (out / "config.json").write_text(json.dumps(c, indent=2))
    sd = load_file(str(out / "model.safetensors"))
    d = cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (1.6e7 ** (torch.arange(0, d, 2).float() / d))
    for i in range(cfg.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv.clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_hf(path: Path, family: str | None = None):
    """The transformers oracle for a tiny directory (pangu -> LlamaForCausalLM with biases)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    c = json.loads((Path(path) / "config.json").read_text())
    if c.get("model_type") == "PanguEmbedded":
        cfg = LlamaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type", "bias")},
                          attention_bias=True, mlp_bias=False)
        m = LlamaForCausalLM.from_pretrained(str(path), config=cfg, dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return m.eval()


def load_quasar(path: Path, device: str = "cpu", dtype=torch.float32, max_seq_len: int = 256,
                quant: str | None = None, **vkw):
    """A quasar Transformer for `path` on `device` (drive it through quasar.engine.ModelRunner,
    which makes its KV cache)."""
    from quasar import backends
    from quasar.config import VerifierConfig
    from quasar.model.loader import build_model
    m = build_model(Path(path), backends.get(device), dtype, max_seq_len, VerifierConfig(quant=quant, **vkw))
    return m
