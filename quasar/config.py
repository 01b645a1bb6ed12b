"""YAML deployment schema: typed dataclasses, validated with errors that name the key path.

    model: smollm2-135m-instruct        # a name from `quasar.fetch`, a local HF dir or a .gguf file
    device: auto                        # auto | cpu | cuda | npu
    dtype: auto                         # auto | float32 | bfloat16 | float16
    max_seq_len: 2048
    verifier: {quant: w8a8-int8, group_size: 128, lm_head_quant: bf16}
    drafter: {method: ngram, num_tokens: 5, ngram: {min: 1, max: 3}}
    sampling: {temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, max_new_tokens: 128}
    runtime: {cuda_graphs: null}

Every level rejects unknown keys (listing the valid ones and the closest match), and every value
is type- and range-checked.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError

SCHEMES = ("bf16", "w8a8-int8", "w8a8-fp8", "w8a16", "w4a16", "w4a4")
DRAFTERS = ("none", "ngram", "quantized_self", "draft_model")


def _c(default=dataclasses.MISSING, *, min=None, max=None, doc="", **kw):
    """A field with range metadata (used by the validator and the README table)."""
    if isinstance(default, type) or callable(default) and not isinstance(default, (int, float, str)):
        return field(default_factory=default, metadata={"min": min, "max": max, "doc": doc}, **kw)
    return field(default=default, metadata={"min": min, "max": max, "doc": doc}, **kw)


@dataclass
class VerifierConfig:
    quant: Optional[Literal[SCHEMES]] = _c(
        None, doc="scheme of every decoder linear; null = the checkpoint's own (bf16 = unquantized, in `dtype`)")
    group_size: int = _c(128, min=-1, doc="int4 group size along K; -1 = per output channel")
    symmetric: bool = _c(True, doc="int4 RTN: symmetric (True) or asymmetric with zero points")
    hadamard: bool = _c(False, doc="fold a Hadamard rotation into int4 weights (keeps w4a4 usable)")
    lm_head_quant: Literal[SCHEMES] = _c("bf16", doc="scheme of lm_head (kept in `dtype` by default)")


@dataclass
class NgramConfig:
    min: int = _c(1, min=1, doc="shortest n-gram tried")
    max: int = _c(3, min=1, doc="longest n-gram tried (tried first)")


@dataclass
class DrafterConfig:
    method: Literal[DRAFTERS] = _c("none", doc="none | ngram | quantized_self | draft_model")
    num_tokens: int = _c(5, min=1, doc="k: tokens drafted per step")
    ngram: NgramConfig = _c(NgramConfig)
    scheme: Optional[Literal[SCHEMES]] = _c(None, doc="quantized_self: scheme the draft runs (default w4a4)")
    model: Optional[str] = _c(None, doc="draft_model: path or name of the small draft model")


@dataclass
class SamplingConfig:
    temperature: float = _c(0.0, min=0.0, doc="0 = greedy")
    top_p: float = _c(1.0, min=0.0, max=1.0, doc="nucleus mass (1 = off)")
    top_k: int = _c(0, min=0, doc="0 = off")
    seed: int = _c(0, min=0, doc="seed of the on-device generator")
    max_new_tokens: int = _c(128, min=1, doc="stop after this many generated tokens")


@dataclass
class RuntimeConfig:
    cuda_graphs: Optional[bool] = _c(None, doc="capture decode/verify steps in CUDA graphs (null = on for CUDA)")
    threads: Optional[int] = _c(None, min=1, doc="CPU threads for torch (null = the default chosen by quasar.runtime_threads)")


@dataclass
class DeployConfig:
    model: str = _c("smollm2-135m-instruct", doc="embedded model name, local HF directory or .gguf file")
    device: Literal["auto", "cpu", "cuda", "npu"] = _c("auto", doc="auto picks cuda, then npu, then cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _c(
        "auto", doc="activation / unquantized-weight dtype (auto: bfloat16 on cuda/npu, float32 on cpu)")
    max_seq_len: int = _c(2048, min=16, doc="static KV cache length (prompt + generated + draft slack)")
    chat: bool = _c(True, doc="apply the tokenizer's chat template when it has one")
    verifier: VerifierConfig = _c(VerifierConfig)
    drafter: DrafterConfig = _c(DrafterConfig)
    sampling: SamplingConfig = _c(SamplingConfig)
    runtime: RuntimeConfig = _c(RuntimeConfig)

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
        _check_value(f.name, hints[f.name], getattr(cfg, f.name), f.metadata)
    d = cfg.drafter
    if d.ngram.min > d.ngram.max:
        raise ConfigError(f"drafter.ngram.min ({d.ngram.min}) must be <= drafter.ngram.max ({d.ngram.max})")
    if d.method == "draft_model" and not d.model:
        raise ConfigError("drafter.method 'draft_model' needs drafter.model (a path or name of the draft model)")
    gs = cfg.verifier.group_size
    if gs == 0 or (gs > 0 and gs % 8):
        raise ConfigError(f"verifier.group_size must be -1 (per channel) or a positive multiple of 8, got {gs}")


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
