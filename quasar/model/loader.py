"""Checkpoint loading: local HF directories (single or sharded safetensors) and compressed-tensors
checkpoints (where a model comes from, embedded name / GGUF / hub id -> a local directory, is
quasar.fetch.resolve_model).

Every problem names the file and the tensor: a missing file, a corrupt safetensors header, a
missing or mis-shaped tensor, an unexpected tensor.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from quasar.errors import CheckpointError, ConfigError
from quasar import quant
from quasar.quant import compressed_tensors as ct
from quasar.quant.format import QuantizedWeight
from .args import ModelArgs, read_config
from .decoder import MLP, Attention, Block, Transformer

log = logging.getLogger("quasar")
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.input_scale|\.output_scale)$")


def _refetch_hint(f: Path) -> str:
    """How to get a good copy: the fetch command for an embedded model's cached files (the
    directory `python -m quasar.fetch` made holds its QUASAR_SOURCE.txt)."""
    from .gguf import cache_root
    d = Path(f).resolve().parent
    try:
        d.relative_to((cache_root() / "models").resolve())
    except ValueError:
        return "fetch or convert it again"
    if (d / "QUASAR_SOURCE.txt").is_file():
        return f"fetch it again: python -m quasar.fetch {d.name} --force"
    return "convert it again (python -m quasar.fetch NAME --force for an embedded model)"


class SafetensorsSource:
    """name -> tensor over a single file or a sharded index, with file-naming errors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
            self.files = {name: self.path / f for name, f in wmap.items()}
            for f in sorted(set(self.files.values())):
                if not f.is_file():
                    raise CheckpointError(f"{f} is listed in {index.name} but does not exist")
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.path} contains no *.safetensors file")
            self.files = {}
            for f in shards:
                for name in self._open(f).keys():
                    self.files[name] = f
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def _open(self, f: Path):
        if f not in getattr(self, "_handles", {}):
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read safetensors ({e}); the file is corrupt or "
                                      f"truncated; {_refetch_hint(f)}") from None
            if not hasattr(self, "_handles"):
                return h
            self._handles[f] = h
        return self._handles[f]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: Optional[tuple] = None) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        f = self.files[name]
        try:
            t = self._open(f).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e}); the file is corrupt") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, the config "
                                  f"implies {tuple(shape)}")
        self.used.add(name)
        return t

    def unused(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.used and not _SKIP.search(n))


def build_model(path: Path, backend, dtype: torch.dtype, max_seq_len: int, verifier,
                draft_scheme: Optional[str] = None) -> Transformer:
    """Load a local HF directory onto `backend`, quantizing (RTN) or unpacking as configured.

    verifier: quasar.config.VerifierConfig. draft_scheme: a second scheme each decoder linear can
    run in draft mode over the same weights (QSpec)."""
    path = Path(path)
    hf = read_config(path)
    return build_from_source(hf, SafetensorsSource(path), path, backend, dtype, max_seq_len, verifier,
                             draft_scheme)


def build_random_model(hf: dict, backend, dtype: torch.dtype, max_seq_len: int, verifier,
                       draft_scheme: Optional[str] = None, seed: int = 0) -> Transformer:
    """A model of the shape `hf` (a config.json dict) with random weights, generated on the
    device: for timing real shapes (Qwen3-8B, OpenPangu-7B) whose weights are not available."""
    return build_from_source(hf, RandomSource(backend.device, seed), Path(f"random-{hf.get('model_type')}"),
                             backend, dtype, max_seq_len, verifier, draft_scheme)


class RandomSource:
    """Stands in for SafetensorsSource: N(0, 0.02) weights, ones for norms, small biases."""

    def __init__(self, device, seed: int = 0):
        self.path, self.device = Path("random"), device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.used: set[str] = set()
        self.files: dict = {}

    def __contains__(self, name):
        return not name.endswith(("weight_packed", "weight_scale", "weight_zero_point"))

    def get(self, name, shape=None):
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device, dtype=torch.bfloat16)
        scale = 0.02 if name.endswith(".weight") else 0.01
        t = torch.randn(shape, device=self.device, dtype=torch.float32, generator=self.generator) * scale
        return t.to(torch.bfloat16)

    def unused(self):
        return []


def build_from_source(hf: dict, src, path: Path, backend, dtype, max_seq_len, verifier,
                      draft_scheme=None) -> Transformer:
    args = ModelArgs.from_hf(hf, str(path / "config.json"))
    backend.check_dtype(dtype)
    ckpt_scheme = ct.checkpoint_scheme(hf, path)
    scheme = quant.canonical(verifier.quant or ckpt_scheme or quant.default())
    draft_scheme = quant.canonical(draft_scheme) if draft_scheme else None
    if ckpt_scheme and scheme != ckpt_scheme:
        raise ConfigError(
            f"{path} is a {ckpt_scheme} compressed-tensors checkpoint but verifier.quant asks for "
            f"{scheme!r}; remove verifier.quant (or set it to {ckpt_scheme!r}), or load the bf16 "
            "checkpoint to quantize it with RTN")
    backend.check_scheme(scheme)
    if draft_scheme:
        backend.check_scheme(draft_scheme)
    a = args
    dev = backend.device
    d = a.head_dim

    def dense(name, shape):
        return src.get(name, shape).to(device=dev, dtype=dtype)

    def raw_linear(prefix: str, n: int, k: int):
        if ckpt_scheme:
            return ct.load_linear(src, prefix, n, k, hf).to(dev)
        return src.get(prefix + ".weight", (n, k)).to(dev)

    def bias(prefix: str, n: int, has: bool):
        return dense(prefix + ".bias", (n,)) if has else None

    def linear(prefixes: list[str], ns: list[int], k: int, has_bias: bool, sch: str, drafted: bool):
        parts = [raw_linear(p, n, k) for p, n in zip(prefixes, ns)]
        biases = [bias(p, n, has_bias) for p, n in zip(prefixes, ns)]
        b = torch.cat(biases) if has_bias else None
        cls = quant.get(sch)
        w_float = None
        if isinstance(parts[0], QuantizedWeight):
            qw = QuantizedWeight.cat(parts) if len(parts) > 1 else parts[0]
        else:
            w_float = torch.cat(parts) if len(parts) > 1 else parts[0]
            qw = cls.quantize(w_float, verifier)
        lin = cls.layer(backend, qw, b, dtype)
        if drafted and draft_scheme and draft_scheme != sch:
            dcls = quant.get(draft_scheme)
            if dcls.accepts(qw):       # QSpec: the very same codes, run another way
                lin.draft = dcls.layer(backend, qw, b, dtype)
            elif w_float is not None:  # the same weights, quantized a second time for drafting
                lin.draft = dcls.layer(backend, dcls.quantize(w_float, verifier), b, dtype)
            else:
                raise ConfigError(f"drafting with {draft_scheme!r} needs weights it can run; this "
                                  f"{sch} checkpoint's weights cannot: load the bf16 checkpoint")
        return lin

    blocks = []
    h, qd, kvd, inter = a.hidden_size, a.num_heads * d, a.num_kv_heads * d, a.intermediate_size
    from tqdm.auto import tqdm
    label = f"loading {path.name} [{scheme}{', draft ' + draft_scheme if draft_scheme else ''}]"
    for i in tqdm(range(a.num_layers), desc=label, leave=False, disable=a.num_layers < 8):
        p = f"model.layers.{i}."
        at = p + "self_attn."
        qkv = linear([at + "q_proj", at + "k_proj", at + "v_proj"], [qd, kvd, kvd], h, a.qkv_bias, scheme, True)
        o = linear([at + "o_proj"], [h], qd, a.o_bias, scheme, True)
        qn = dense(at + "q_norm.weight", (d,)) if a.qk_norm else None
        kn = dense(at + "k_norm.weight", (d,)) if a.qk_norm else None
        mp = p + "mlp."
        gu = linear([mp + "gate_proj", mp + "up_proj"], [inter, inter], h, a.mlp_bias, scheme, True)
        down = linear([mp + "down_proj"], [h], inter, a.mlp_bias, scheme, True)
        attn = Attention(a, i, qkv, o, qn, kn, backend)
        blocks.append(Block(a, attn, MLP(gu, down, backend), dense(p + "input_layernorm.weight", (h,)),
                            dense(p + "post_attention_layernorm.weight", (h,)), backend))
    embed = dense("model.embed_tokens.weight", (a.vocab_size, h))
    norm = dense("model.norm.weight", (h,))
    head_scheme = quant.canonical(verifier.lm_head_quant or quant.default())
    if a.tie_word_embeddings:
        src.used.add("lm_head.weight")
        head_w = embed
    elif ckpt_scheme and ("lm_head.weight_scale" in src.files or "lm_head.weight_packed" in src.files):
        # a checkpoint whose lm_head was quantized too: run it in the checkpoint's scheme
        head_w = ct.load_linear(src, "lm_head", a.vocab_size, h, hf).to(dev)
        head_scheme = ckpt_scheme
    else:
        head_w = src.get("lm_head.weight", (a.vocab_size, h)).to(dev)
    hcls = quant.get(head_scheme)
    lm_head = hcls.layer(backend, head_w if not isinstance(head_w, torch.Tensor) else hcls.quantize(head_w, verifier),
                         None, dtype)
    extra = src.unused()
    if extra:
        raise CheckpointError(f"{path}: unexpected tensors not used by a {a.family} model: "
                              f"{', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
    model = Transformer(a, embed, blocks, norm, lm_head, backend, dtype, max_seq_len)
    model.scheme, model.draft_scheme, model.path = scheme, draft_scheme, path
    return model


__all__ = ["build_model", "build_random_model", "SafetensorsSource"]
