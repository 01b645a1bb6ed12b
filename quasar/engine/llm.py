"""LLM: a deployment config turned into a loaded verifier, tokenizer, drafter and scheduler.

    from quasar import LLM
    from quasar.config import DeployConfig
    llm = LLM(DeployConfig(drafter={"method": "ngram"}, verifier={"quant": "w8a8-int8"}))
    print(llm.generate("Write a haiku about GPUs.").text)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from quasar import backends, quant
from quasar.config import DeployConfig
from quasar.errors import CheckpointError, ConfigError
from quasar.fetch import resolve_model
from quasar.model.loader import build_model
from quasar.spec_decode import make_drafter
from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Scheduler, Stats
from .model_runner import ModelRunner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    stats: Stats


def resolve_dtype(name: str, backend) -> torch.dtype:
    """`auto` -> the backend's default (float32 on the CPU, bfloat16 on accelerators)."""
    if name == "auto":
        return backend.default_dtype()
    return DTYPES[name]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from None


def eos_ids(path: Path, tokenizer) -> set[int]:
    """generation_config.json's eos_token_id (what transformers' generate stops on), else the
    config's, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        f = Path(path) / name
        if f.is_file():
            e = json.loads(f.read_text()).get("eos_token_id")
            if e is not None:
                return set(e) if isinstance(e, list) else {int(e)}
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


class LLM:
    def __init__(self, cfg: DeployConfig, model_path: Optional[Path] = None):
        self.cfg = cfg
        self.device = backends.resolve_device(cfg.device)
        from quasar import threads
        self.threads = threads.apply(cfg.runtime.threads)
        self.backend = backends.get(self.device, cfg.runtime.kernels)
        self.dtype = resolve_dtype(cfg.dtype, self.backend)
        self.path = Path(model_path) if model_path else resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.path)
        d = cfg.drafter
        draft_scheme = (d.scheme or quant.DEFAULT_DRAFT) if d.method == "quantized_self" else None
        if d.scheme and d.method != "quantized_self":
            raise ConfigError(f"drafter.scheme applies to drafter.method 'quantized_self', not {d.method!r}")
        self.model = build_model(self.path, self.backend, self.dtype, cfg.max_seq_len, cfg.verifier,
                                 draft_scheme=draft_scheme)
        self.eos = eos_ids(self.path, self.tokenizer)
        s = cfg.sampling
        self.sp = SamplingParams(s.temperature, s.top_p, s.top_k, s.seed)
        self.generator = torch.Generator(device=self.backend.device)
        self.draft_llm = None
        if d.method == "draft_model":
            self.draft_llm = self._load_draft(d.model)
        self.k = d.num_tokens if d.method != "none" else 0
        modes = ("verify", "draft") if draft_scheme is not None else ("verify",)
        self.runner = ModelRunner(self.model, batch=1, chunk_lengths=range(1, self.k + 2), modes=modes,
                                  graphs=cfg.runtime.cuda_graphs)
        self.drafter = make_drafter(d, self.runner, self.sp, self.draft_llm.runner if self.draft_llm else None)
        if hasattr(self.drafter, "generator"):
            self.drafter.generator = self.generator
        self.scheduler = Scheduler(self.runner, self.drafter, self.sp, self.k, self.eos, self.generator,
                                   sync=self.backend.synchronize)

    def _load_draft(self, name: str) -> "LLM":
        from quasar.config import override
        dcfg = override(self.cfg, {"model": name, "drafter.method": "none"})
        dcfg.drafter.model = dcfg.drafter.scheme = None
        dcfg.verifier.quant = quant.default()        # the draft model runs unquantized
        draft = LLM(dcfg)
        if draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(f"drafter.model {name!r} has a different tokenizer (vocabulary) than the "
                              f"target {self.cfg.model!r}; a draft model must share the target's tokenizer")
        return draft

    def encode(self, prompt: str, chat: Optional[bool] = None) -> list[int]:
        chat = self.cfg.chat if chat is None else chat
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt)["input_ids"]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: Optional[int] = None, on_tokens=None):
        self.generator.manual_seed(self.sp.seed)
        n = max_new_tokens or self.cfg.sampling.max_new_tokens
        return self.scheduler.generate(prompt_ids, n, on_tokens)

    def generate(self, prompt: str, max_new_tokens: Optional[int] = None, chat: Optional[bool] = None,
                 on_tokens=None) -> Result:
        ids = self.encode(prompt, chat)
        out, stats = self.generate_ids(ids, max_new_tokens, on_tokens)
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return Result(ids, out, text, stats)
