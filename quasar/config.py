"""YAML deployment schema: typed dataclasses, validated with errors that name the key path.

    model: smollm2-135m-instruct        # a name from `quasar.fetch`, a local HF dir or a .gguf file
    device: auto                        # auto | cpu | cuda | npu
    dtype: auto                         # auto | float32 | bfloat16 | float16
    max_seq_len: 2048
    verifier: {quant: w8a8-int8, group_size: auto, lm_head_quant: unquantized}
    drafter: {method: ngram, num_tokens: 5, ngram: {min: 1, max: 3}}
    sampling: {temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, max_new_tokens: 128}
    runtime: {cuda_graphs: null, threads: null, kernels: {pdl: auto, prefetch: true, early_loads: true,
              ptx_dequant: true, tuning: auto}}

Every level rejects unknown keys (listing the valid ones and the closest match), and every value
is type- and range-checked. Scheme names come from the scheme registry (quasar.quant.SCHEMES);
`bf16` is accepted as the old name of `unquantized`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError



def _c(default=dataclasses.MISSING, *, min=None, max=None, doc="", check=None, **kw):
    """A field with range metadata (used by the validator and the README table). check(path,
    value) -> value: a custom validation (scheme names, group sizes)."""
    meta = {"min": min, "max": max, "doc": doc, "check": check}
    if isinstance(default, type) or callable(default) and not isinstance(default, (int, float, str)):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _close(value, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def scheme_choice(path: str, value):
    """A registered scheme name (or alias) -> its registered name."""
    from quasar import quant
    if not isinstance(value, str) or quant.canonical(value) not in quant.SCHEMES:
        names = quant.names()
        raise ConfigError(f"{path} must be one of {', '.join(repr(n) for n in names)}, got {value!r}"
                          + _close(value, quant.names(with_aliases=True)))
    return quant.canonical(value)


def drafter_choice(path: str, value):
    """A registered drafter (quasar.spec_decode.DRAFTERS)."""
    from quasar.spec_decode import DRAFTERS
    if value not in DRAFTERS:
        raise ConfigError(f"{path} must be one of {', '.join(repr(n) for n in DRAFTERS)}, got {value!r}"
                          + _close(value, DRAFTERS))
    return value


def group_size_choice(path: str, value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1 or (value > 0 and value % 8):
        raise ConfigError(f"{path} must be 'auto', -1 (per channel) or a positive multiple of 8, got {value!r}")
    return value


def tuning_choice(path: str, value):
    if not isinstance(value, str):
        raise ConfigError(f"{path} must be 'auto', 'none' or the path of a tuning JSON file, got {value!r}")
    if value not in ("auto", "none") and not Path(value).expanduser().is_file():
        raise ConfigError(f"{path}: tuning file {value} does not exist; give 'auto', 'none' or the JSON "
                          "file written by `python -m quasar.bench.ops --out FILE`")
    return value


def memory_choice(path: str, value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{path} must be 'auto', a fraction of free device memory in (0, 1], or GiB (> 1), "
                          f"got {value!r}")
    return float(value)


def buckets_choice(path: str, value):
    if (not isinstance(value, list) or not value
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in value)):
        raise ConfigError(f"{path} must be a non-empty list of batch sizes >= 1 (e.g. [1, 2, 4, 8]), got {value!r}")
    return sorted(set(value))


@dataclass
class VerifierConfig:
    quant: Optional[str] = _c(
        None, check=scheme_choice,
        doc="scheme of every decoder linear (see the scheme table); null = the checkpoint's own (unquantized for float checkpoints)")
    group_size: Any = _c("auto", check=group_size_choice,
                         doc="int4 group size along K: auto (128 where it divides K, else 64 or 32, else per channel), 32, 64, 128, ..., or -1 = per output channel")
    symmetric: bool = _c(True, doc="int4 RTN: symmetric (True) or asymmetric with zero points")
    hadamard: bool = _c(False, doc="fold a Hadamard rotation into int4 weights (keeps w4a4 usable)")
    lm_head_quant: Optional[str] = _c(None, check=scheme_choice, doc="scheme of lm_head; null = unquantized (kept in `dtype`)")


@dataclass
class NgramConfig:
    min: int = _c(1, min=1, doc="shortest n-gram tried")
    max: int = _c(3, min=1, doc="longest n-gram tried (tried first)")


@dataclass
class TreeConfig:
    depth: int = _c(3, min=1, max=16, doc="tree drafts: the longest root path (tokens)")
    topk: int = _c(4, min=1, max=16, doc="tree drafts: children expanded per node (draft_model / quantized_self), or matches merged (ngram)")
    max_nodes: int = _c(16, min=2, max=64, doc="tree drafts: nodes verified per step, root included (<= 64)")


@dataclass
class DrafterConfig:
    method: str = _c("none", check=drafter_choice, doc="none | ngram | quantized_self | draft_model | hierarchical (quasar.spec_decode.DRAFTERS)")
    num_tokens: int = _c(5, min=1, doc="k: tokens drafted per step")
    ngram: NgramConfig = _c(NgramConfig)
    scheme: Optional[str] = _c(None, check=scheme_choice, doc="quantized_self: scheme the draft runs (default w4a4)")
    model: Optional[str] = _c(None, doc="draft_model: path or name of the small draft model")
    adaptive: bool = _c(True, doc="choose the tokens drafted per step from the step cost model and each sequence's acceptance (false: always num_tokens)")
    kv: Literal["full", "upper"] = _c("full", doc="quantized_self on a hierarchical KV cache: the view its draft steps read (upper: the 4-bit upper plane, QuantSpec; full: both planes)")
    tree: Optional[TreeConfig] = _c(None, doc="draft trees {depth, topk, max_nodes} for ngram / draft_model / quantized_self (SpecMQuant stage 1 for hierarchical); null = chains")
    intermediate: str = _c("self", doc="hierarchical: the model that verifies the tree into a chain: 'self' (the target in drafter.scheme, default w4a16) or a draft model's path or name")
    min_chain: int = _c(6, min=1, doc="hierarchical: chain length the intermediate builds before the target verifies it")


def representation_choice(path: str, value):
    from quasar import kv
    names = kv.names()
    if value == "bf16":            # the and QuantSpec's name for the unquantized cache
        value = "dense"
    if value not in names:
        raise ConfigError(f"{path} must be one of {', '.join(names)} (bf16 = dense), got {value!r}{_close(value, names)}")
    return value


@dataclass
class KVCacheConfig:
    representation: str = _c("dense", check=representation_choice,
                             doc="dense (alias bf16): K/V in the model dtype; hierarchical-int4: QuantSpec's INT4/INT8 planes + a full-precision buffer of recent tokens")
    group_size: int = _c(128, min=2, doc="hierarchical-int4: tokens per key group (the block size: runtime.kv_block_size does not apply) and channels per value group")
    residual_tokens: int = _c(128, min=0, doc="hierarchical-int4: recent tokens kept at full precision (R; each sequence holds R..R+group_size)")


@dataclass
class SamplingConfig:
    temperature: float = _c(0.0, min=0.0, doc="0 = greedy")
    top_p: float = _c(1.0, min=0.0, max=1.0, doc="nucleus mass (1 = off)")
    top_k: int = _c(0, min=0, doc="0 = off")
    seed: int = _c(0, min=0, doc="seed of the on-device generator")
    max_new_tokens: int = _c(128, min=1, doc="stop after this many generated tokens")


@dataclass(frozen=True)
class KernelConfig:
    """Kernel options of the CUDA backend (other backends ignore them). Environment variables
    override them, read in one place (`with_env`): QUASAR_PDL, QUASAR_PREFETCH, QUASAR_EARLY,
    QUASAR_PTX_DEQUANT, QUASAR_TRITON_TUNING."""
    pdl: Literal["auto", "on", "off"] = _c("auto", doc="programmatic dependent launch: auto (sm_90+), on, off")
    prefetch: int = _c(1, min=0, max=8, doc="weight blocks each GEMM program prefetches into L2 before the PDL wait (0 = off)")
    early_loads: bool = _c(True, doc="8-bit GEMMs and attention load their first block before the PDL wait")
    ptx_dequant: bool = _c(True, doc="int4 / w8a16 weight conversion in inline PTX on the GPU (else Triton's)")
    tuning: str = _c("auto", check=tuning_choice,
                     doc="GEMM launch table: auto (shipped for this GPU), none, or a JSON from python -m quasar.bench.ops")

    _ENV = {"pdl": "QUASAR_PDL", "prefetch": "QUASAR_PREFETCH", "early_loads": "QUASAR_EARLY",
            "ptx_dequant": "QUASAR_PTX_DEQUANT", "tuning": "QUASAR_TRITON_TUNING"}

    def with_env(self, environ=None) -> "KernelConfig":
        """These options with the QUASAR_* environment overrides applied (the one place they are read)."""
        env = os.environ if environ is None else environ
        upd: dict = {}
        for key, var in self._ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            v = raw.strip()
            low = v.lower()
            if key == "pdl":
                upd[key] = "on" if low in ("force", "on", "1", "true", "yes") else (
                    "off" if low in ("0", "off", "false", "no") else "auto")
            elif key == "tuning":
                upd[key] = low if low in ("auto", "none") else v
            elif key == "prefetch":
                upd[key] = int(low) if low.isdigit() else (0 if low in ("off", "false", "no") else 1)
            else:
                upd[key] = low not in ("0", "off", "false", "no")
        if not upd:
            return self
        out = dataclasses.replace(self, **upd)
        _check_value("runtime.kernels", KernelConfig, out, {})
        return out


@dataclass
class RuntimeConfig:
    cuda_graphs: Optional[bool] = _c(None, doc="capture decode/verify steps in CUDA graphs (null = on for CUDA)")
    threads: Optional[int] = _c(None, min=1, doc="CPU threads for torch (null = the default chosen by quasar.threads)")
    kernels: KernelConfig = _c(KernelConfig, doc="kernel options (CUDA): pdl, prefetch, early_loads, ptx_dequant, tuning")
    max_batch_size: int = _c(64, min=1, doc="sequences decoded together (continuous batching)")
    max_prefill_tokens: int = _c(2048, min=16, doc="prompt tokens per prefill step (longer prompts are prefilled in chunks)")
    kv_block_size: int = _c(16, min=1, max=1024, doc="KV cache block (page) size in tokens")
    kv_cache_memory: Any = _c("auto", check=memory_choice,
                              doc="KV cache budget: GiB (> 1), a fraction (<= 1) of free device memory, or auto (max_batch_size full-length sequences, at most 90% of free memory)")
    prefix_caching: bool = _c(True, doc="share the KV blocks of identical prompt prefixes across requests")
    cuda_graph_batch_sizes: Any = _c(lambda: [1, 2, 4, 8, 16, 32, 64], check=buckets_choice,
                                     doc="batch-size buckets captured as CUDA graphs (inputs padded to the bucket)")


def api_key_choice(path: str, value):
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{path} must be a non-empty string or null (no authentication), got {value!r}")
    return value


@dataclass
class ServerConfig:
    """`quasar serve` (python -m quasar.serve); the flags of the same names override these."""
    host: str = _c("127.0.0.1", doc="address to listen on (0.0.0.0: every interface)")
    port: int = _c(8000, min=0, max=65535, doc="TCP port (0: a free one, printed at start)")
    api_key: Optional[str] = _c(None, check=api_key_choice,
                                doc="require `Authorization: Bearer KEY` on /v1/* (null: no authentication; env QUASAR_API_KEY)")
    served_model_name: Optional[str] = _c(None, doc="the model name clients send (null: the config's `model`)")
    max_waiting: int = _c(1024, min=1, doc="requests allowed to wait for a batch slot; more get 503 with Retry-After")
    shutdown_timeout: float = _c(30.0, min=0.0, doc="seconds SIGTERM waits for in-flight requests before aborting them")
    retry_after: int = _c(1, min=1, doc="Retry-After seconds sent with a 503")


@dataclass
class DeployConfig:
    model: str = _c("smollm2-135m-instruct", doc="embedded model name, local HF directory or .gguf file")
    device: Literal["auto", "cpu", "cuda", "npu"] = _c("auto", doc="auto picks cuda, then npu, then cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _c(
        "auto", doc="activation / unquantized-weight dtype (auto: bfloat16 on cuda/npu, float32 on cpu)")
    max_seq_len: int = _c(2048, min=16, doc="static KV cache length (prompt + generated + draft slack)")
    chat: bool = _c(True, doc="apply the tokenizer's chat template when it has one")
    verifier: VerifierConfig = _c(VerifierConfig)
    kv_cache: KVCacheConfig = _c(KVCacheConfig)
    drafter: DrafterConfig = _c(DrafterConfig)
    sampling: SamplingConfig = _c(SamplingConfig)
    runtime: RuntimeConfig = _c(RuntimeConfig)
    server: ServerConfig = _c(ServerConfig)

    def __post_init__(self):
        validate(self)


# ---------------------------------------------------------------- validation

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_value(path: str, tp, value, meta: dict):
    if meta.get("check") is not None:
        if value is None and typing.get_origin(tp) is typing.Union:
            return None
        return meta["check"](path, value)
    origin = typing.get_origin(tp)
    nullable = ""
    if origin is typing.Union:
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
        nullable = " or null"
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            hints = typing.get_type_hints(tp)
            for f in dataclasses.fields(tp):
                v = _check_value(f"{path}.{f.name}", hints[f.name], getattr(value, f.name), f.metadata)
                object.__setattr__(value, f.name, v)      # canonical values (scheme aliases, floats)
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping with keys {_keys(tp)}, got {value!r}")
        return _from_dict(tp, value, path + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            aliases = {"gpu": "cuda", "nvidia": "cuda", "ascend": "npu", "bf16": "bfloat16",
                       "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
            alias = aliases.get(str(value).lower())
            close = [alias] if alias in choices else \
                difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path} must be {_type_name(tp)}{nullable}, got {value!r}{hint}")
        return value
    bad = False
    if tp is bool:
        bad = not isinstance(value, bool)
    elif tp is int:
        bad = isinstance(value, bool) or not isinstance(value, int)
    elif tp is float:
        bad = isinstance(value, bool) or not isinstance(value, (int, float))
        value = value if bad else float(value)
    elif tp is str:
        bad = not isinstance(value, str)
    lo, hi = meta.get("min"), meta.get("max")
    rng = ""
    if lo is not None and hi is not None:
        rng = f" in [{lo}, {hi}]"
    elif lo is not None:
        rng = f" >= {lo}"
    elif hi is not None:
        rng = f" <= {hi}"
    if not bad and tp in (int, float):
        bad = (lo is not None and value < lo) or (hi is not None and value > hi)
    if bad:
        raise ConfigError(f"{path} must be {_type_name(tp)}{rng}{nullable}, got {value!r}")
    return value


def _keys(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _from_dict(cls, data: dict, prefix: str = ""):
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            where = f"in {prefix[:-1]}" if prefix else "at the top level"
            raise ConfigError(f"unknown key {key!r} {where}; valid keys: {_keys(cls)}{hint}")
    kwargs = {k: _check_value(prefix + k, hints[k], v, names[k].metadata) for k, v in data.items()}
    return cls(**kwargs)


def validate(cfg: DeployConfig) -> None:
    """Field checks (types/ranges) plus the cross-field rules."""
    hints = typing.get_type_hints(DeployConfig)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _check_value(f.name, hints[f.name], getattr(cfg, f.name), f.metadata))
    d = cfg.drafter
    if d.ngram.min > d.ngram.max:
        raise ConfigError(f"drafter.ngram.min ({d.ngram.min}) must be <= drafter.ngram.max ({d.ngram.max})")
    if d.method == "draft_model" and not d.model:
        raise ConfigError("drafter.method 'draft_model' needs drafter.model (a path or name of the draft model)")
    if d.tree is not None:
        if d.method == "none":
            raise ConfigError("drafter.tree needs a drafter: set drafter.method to ngram, draft_model, "
                              "quantized_self or hierarchical")
        if cfg.kv_cache.representation != "dense":
            raise ConfigError(f"drafter.tree (tree verification) needs kv_cache.representation dense; "
                              f"{cfg.kv_cache.representation!r} does not move a tree's accepted path yet")
        grown = 1 + d.tree.topk * (d.tree.depth - 1)
        if d.method in ("draft_model", "quantized_self") and grown > 64:
            raise ConfigError(f"drafter.tree: a model-drafted tree expands 1 + topk * (depth - 1) = {grown} "
                              "nodes, more than the 64 a tree step takes; lower drafter.tree.topk or depth")
    if d.method == "hierarchical" and d.tree is None:
        raise ConfigError("drafter.method 'hierarchical' needs drafter.tree {depth, topk, max_nodes}: the "
                          "stage-1 (n-gram) tree that the intermediate verifies into a chain")
    if d.kv == "upper" and (d.method != "quantized_self" or cfg.kv_cache.representation != "hierarchical-int4"):
        raise ConfigError("drafter.kv: upper (QuantSpec's draft on the 4-bit upper plane) needs drafter.method "
                          f"quantized_self and kv_cache.representation hierarchical-int4; got method {d.method!r} "
                          f"and representation {cfg.kv_cache.representation!r}")


def from_dict(data: dict | None) -> DeployConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a YAML mapping, got {type(data).__name__}")
    return _from_dict(DeployConfig, data)


def load(path: str | Path) -> DeployConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: DeployConfig) -> dict:
    return dataclasses.asdict(cfg)


def override(cfg: DeployConfig, updates: dict[str, Any]) -> DeployConfig:
    """Apply dotted-key overrides (CLI flags); None values are skipped."""
    data = to_dict(cfg)
    for key, value in updates.items():
        if value is None:
            continue
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return from_dict(data)
