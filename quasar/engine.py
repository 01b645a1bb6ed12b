"""LLM: a deployment config turned into a loaded verifier, tokenizer, drafter and scheduler."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from quasar import backends
from quasar.config import DeployConfig
from quasar.errors import CheckpointError, ConfigError
from quasar.model.loader import build_model, resolve_model
from quasar.spec_decode.drafter import make_drafter
from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Scheduler, Stats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    stats: Stats


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
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
    def __init__(self, cfg: DeployConfig, model_path: Optional[Path] = None, skip_layers=()):
        self.cfg = cfg
        self.device = backends.resolve_device(cfg.device)
        from quasar import threads
        self.threads = threads.apply(cfg.runtime.threads)
        self.backend = backends.get(self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.path = Path(model_path) if model_path else resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.path)
        d = cfg.drafter
        draft_scheme = (d.scheme or "w4a4") if d.method == "quantized_self" else None
        if d.scheme and d.method != "quantized_self":
            raise ConfigError(f"drafter.scheme applies to drafter.method 'quantized_self', not {d.method!r}")
        self.model = build_model(self.path, self.backend, self.dtype, cfg.max_seq_len, cfg.verifier,
                                 draft_scheme=draft_scheme, skip_layers=skip_layers)
        self.model.new_cache(1)
        self.eos = eos_ids(self.path, self.tokenizer)
        s = cfg.sampling
        self.sp = SamplingParams(s.temperature, s.top_p, s.top_k, s.seed)
        self.generator = torch.Generator(device=self.backend.device)
        self.draft_llm = None
        if d.method == "draft_model":
            self.draft_llm = self._load_draft(d.model)
        self.k = d.num_tokens if d.method != "none" else 0
        self._install_runner(draft_scheme is not None)
        self.drafter = make_drafter(d, self.model, self.sp, self.draft_llm.model if self.draft_llm else None)
        if hasattr(self.drafter, "generator"):
            self.drafter.generator = self.generator
        self.scheduler = Scheduler(self.model, self.drafter, self.sp, self.k, self.eos, self.generator,
                                   sync=self.backend.ops.get("synchronize"))

    def _install_runner(self, drafts_in_place: bool) -> None:
        """Captured step execution (CUDA graphs) when the backend has it and the config allows."""
        want = self.cfg.runtime.cuda_graphs
        make = self.backend.make_runner
        if want and make is None:
            raise ConfigError(f"runtime.cuda_graphs is true but the {self.backend.name} backend has no "
                              "graph capture; set it to null or false")
        if make is None or want is False:
            return
        modes = ("verify", "draft") if drafts_in_place else ("verify",)
        self.model.runner = make(self.model, list(range(1, self.k + 2)), modes)

    def _load_draft(self, name: str) -> "LLM":
        from quasar.config import override
        dcfg = override(self.cfg, {"model": name, "drafter.method": "none", "drafter.model": None,
                                   "verifier.quant": "bf16", "drafter.scheme": None})
        dcfg.drafter.model = None
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
