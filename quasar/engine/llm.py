"""LLM: a deployment config turned into a loaded verifier, tokenizer, drafter and scheduler.

    from quasar import LLM
    from quasar.config import DeployConfig
    llm = LLM(DeployConfig(drafter={"method": "ngram"}, verifier={"quant": "w8a8-int8"}))
    print(llm.generate("Write a haiku about GPUs.").text)
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence as Sequence_, Union

import torch

from quasar import backends, kv, quant
from quasar.config import DeployConfig
from quasar.errors import CheckpointError, ConfigError, ContextLengthError
from quasar.fetch import resolve_model
from quasar.model.loader import build_model
from quasar.spec_decode import DRAFTERS, make_drafter
from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Stats
from .cost_model import calibrate_runner
from .engine import Engine
from .model_runner import ModelRunner
from .sequence import Sequence, StopConditions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    stats: Stats
    finish_reason: str = ""
    error: Optional[str] = None         # a request that failed (its own error; the others ran)


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


log = logging.getLogger("quasar")


def kv_blocks_for(cfg: DeployConfig, per_block: int, bs: int, backend, k: int, fixed: int = 0) -> tuple[int, str]:
    """The KV cache's block count from runtime.kv_cache_memory (blocks of `bs` tokens and
    `per_block` bytes, after `fixed` bytes the representation needs beside its blocks), and how
    it was chosen."""
    rt = cfg.runtime
    budget = rt.kv_cache_memory
    free = backend.free_memory()
    if budget == "auto":
        want = rt.max_batch_size * (-(-(cfg.max_seq_len + k + 1) // bs))
        cap = min(0.9 * free, backend.auto_kv_cap_gib * 2 ** 30)
        blocks, how = min(want, int(max(0, cap - fixed) // per_block)), "auto"
    elif budget <= 1.0:
        blocks, how = int(max(0, budget * free - fixed) // per_block), f"{budget:g} of {free / 2 ** 30:.1f} GiB free"
    else:
        blocks, how = int(max(0, budget * 2 ** 30 - fixed) // per_block), f"{budget:g} GiB"
    if blocks * bs < cfg.max_seq_len // 4 or blocks < 1:
        raise ConfigError(f"runtime.kv_cache_memory ({how}) gives {blocks} KV blocks of {bs} tokens "
                          f"({per_block / 2 ** 20:.2f} MiB each), too few for one sequence of max_seq_len "
                          f"{cfg.max_seq_len}; raise runtime.kv_cache_memory or lower max_seq_len")
    return blocks, how


def tree_widths(max_nodes: int) -> tuple[int, ...]:
    """The verify chunk sizes of tree steps (a tree is padded to the smallest that holds it)."""
    return tuple(sorted({w for w in (8, 16, 32) if w < max_nodes} | {max_nodes}))


class LLM:
    def __init__(self, cfg: DeployConfig, model_path: Optional[Path] = None, kv_blocks: Optional[int] = None):
        """kv_blocks: the paged cache's block count (a draft model takes its target's); None =
        from runtime.kv_cache_memory."""
        self.cfg = cfg
        self.device = backends.resolve_device(cfg.device)
        from quasar import threads
        self.threads = threads.apply(cfg.runtime.threads)
        self.backend = backends.get(self.device, cfg.runtime.kernels)
        self.backend.check_kv(cfg.kv_cache.representation)
        self.dtype = resolve_dtype(cfg.dtype, self.backend)
        self.path = Path(model_path) if model_path else resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.path)
        d = cfg.drafter
        kind = DRAFTERS[d.method]
        draft_scheme = kind.draft_scheme(d)
        if d.scheme and draft_scheme is None:
            raise ConfigError(f"drafter.scheme applies to drafter.method 'quantized_self' (or 'hierarchical' "
                              f"with intermediate: self), not {d.method!r}")
        self.model = build_model(self.path, self.backend, self.dtype, cfg.max_seq_len, cfg.verifier,
                                 draft_scheme=draft_scheme)
        self.eos = eos_ids(self.path, self.tokenizer)
        s = cfg.sampling
        self.sp = SamplingParams(s.temperature, s.top_p, s.top_k, s.seed)
        self.k = kind.step_tokens(d)
        tree = d.tree is not None
        rt = cfg.runtime
        layout = kv.Layout.from_config(cfg, self.k)
        bs = layout.block_size
        per_block = layout.bytes_per_block(self.model.args, self.dtype)
        fixed = layout.fixed_bytes(self.model.args, self.dtype)
        self.draft_llm = None
        if kind.draft_model(d):
            self.draft_llm = self._load_draft(kind.draft_model(d), bs)
            per_block += bs * kv.bytes_per_token(self.draft_llm.model.args, self.draft_llm.dtype)
        how = "given"
        if kv_blocks is None:
            kv_blocks, how = kv_blocks_for(cfg, per_block, bs, self.backend, self.k, fixed)
        buckets = sorted({b for b in rt.cuda_graph_batch_sizes if b < rt.max_batch_size} | {rt.max_batch_size})
        modes = ("verify", "draft") if draft_scheme is not None else ("verify",)
        # trees: the verify (and tree-growing draft) steps are padded to a few captured tree sizes
        widths = tree_widths(d.tree.max_nodes) if tree else ()
        chains = 2 if kind.drafts_trees(d) else self.k + 2      # chain steps 1 .. k + 1 (trees: decode)
        self.runner = ModelRunner(self.model, chunk_lengths=range(1, chains), modes=modes,
                                  graphs=rt.cuda_graphs, kv_blocks=kv_blocks, block_size=bs,
                                  buckets=buckets, layout=layout, tree_lengths=widths)
        if self.draft_llm is not None:
            self.draft_llm.runner = ModelRunner(self.draft_llm.model, chunk_lengths=(1,), graphs=rt.cuda_graphs,
                                                kv_blocks=kv_blocks, block_size=bs, buckets=buckets)
        self.drafter = make_drafter(d, self.runner, self.sp, self.draft_llm.runner if self.draft_llm else None)
        cost = None
        adaptive = d.adaptive and not tree      # trees: a fixed shape (the cost model prices chains)
        if adaptive and self.k > 0:
            cost = calibrate_runner(self.runner, self.k, rt.max_batch_size, self.backend.synchronize,
                                    device_drafter=self.drafter.on_device)
            if self.draft_llm is not None:      # a separate draft model: its own step cost ratio
                dc = calibrate_runner(self.draft_llm.runner, 0, 1, self.backend.synchronize)
                cost.draft_ratio = dc.time(1) / cost.time(1)
        self.engine = Engine(self.runner, self.drafter, self.k, max_batch_size=rt.max_batch_size,
                             max_prefill_tokens=rt.max_prefill_tokens, prefix_caching=rt.prefix_caching,
                             adaptive=adaptive, sync=self.backend.synchronize, cost=cost)
        pool = getattr(self.runner.cache, "fp_blocks", 0)
        extra = f", of which a full-precision pool of {pool} blocks" if pool else ""
        self.kv_summary = (f"KV cache ({layout.representation}): {kv_blocks} blocks of {bs} = {kv_blocks * bs} "
                           f"tokens, {self.runner.cache.nbytes() / 2 ** 30:.2f} GiB{extra} ({how})")
        if how != "given":
            log.info(self.kv_summary)
        if rt.prefix_caching and not layout.prefix_caching:
            log.info(f"prefix caching is off with kv_cache.representation {layout.representation} (a shared "
                     "prompt block may no longer have the full-precision copy a new request's queries read)")

    def _load_draft(self, name: str, block_size: int) -> "LLM":
        from quasar.config import override
        # the draft model's own cache is dense, addressed by the target's block tables
        dcfg = override(self.cfg, {"model": name, "drafter.method": "none", "drafter.kv": "full",
                                   "kv_cache.representation": "dense", "runtime.kv_block_size": block_size})
        dcfg.drafter.model = dcfg.drafter.scheme = None
        dcfg.verifier.quant = quant.default()        # the draft model runs unquantized
        draft = LLM(dcfg, kv_blocks=1 + -(-self.cfg.max_seq_len // block_size))
        if draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(f"drafter.model {name!r} has a different tokenizer (vocabulary) than the "
                              f"target {self.cfg.model!r}; a draft model must share the target's tokenizer")
        return draft

    def encode(self, prompt: str, chat: Optional[bool] = None) -> list[int]:
        """A prompt's ids: as the one user message of a chat (the tokenizer's chat template, when
        `chat` and it has one), else the raw text."""
        chat = self.cfg.chat if chat is None else chat
        if chat and self.has_chat_template:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation's ids through the tokenizer's chat template, with the assistant's turn
        opened. No template, or one that rejects the conversation: ConfigError naming why."""
        tok = self.tokenizer
        if not self.has_chat_template:
            raise ConfigError(f"the tokenizer of {self.cfg.model!r} has no chat template; send raw text "
                              "(the completions API, or chat: false) or use a model with one")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:          # jinja's own errors (e.g. roles must alternate)
            raise ConfigError(f"the chat template rejected the messages: {e}") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def check_prompt(self, ids: list[int], max_new_tokens: Optional[int] = None) -> Optional[str]:
        """Why this prompt cannot run (None if it can): empty, or too long for max_seq_len."""
        if not ids:
            return "the prompt is empty (no tokens)"
        V = self.model.args.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            return f"the prompt has token ids outside the vocabulary [0, {V}): {bad[:5]}"
        S = self.cfg.max_seq_len
        if len(ids) >= S:
            n = max_new_tokens or self.cfg.sampling.max_new_tokens
            return (f"the prompt has {len(ids)} tokens but max_seq_len is {S}; raise max_seq_len "
                    f"(--max-seq-len / max_seq_len:) to at least {len(ids) + n + self.k + 1} or shorten the prompt")
        return self.engine.capacity_error(len(ids))

    def sequence(self, ids: list[int], sp: Optional[SamplingParams] = None, max_new_tokens: Optional[int] = None,
                 index: int = 0, on_tokens=None) -> Sequence:
        sp = sp or self.sp
        n = sp.max_tokens or max_new_tokens or self.cfg.sampling.max_new_tokens
        stop = StopConditions(n, frozenset(self.eos), frozenset(sp.stop_token_ids), sp.ignore_eos)
        return Sequence(list(ids), sampling=sp, stop=stop, index=index, on_tokens=on_tokens)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: Optional[int] = None, on_tokens=None,
                     sampling_params: Optional[SamplingParams] = None):
        """One prompt of token ids -> (new token ids, Stats); a prompt that cannot run raises."""
        why = self.check_prompt(prompt_ids, max_new_tokens)
        if why:
            raise ContextLengthError(why)
        seq = self.sequence(prompt_ids, sampling_params, max_new_tokens, on_tokens=on_tokens)
        self.engine.run([seq])
        if seq.error:
            raise ContextLengthError(seq.error)
        return seq.output_ids, seq.stats

    def generate(self, prompts: Union[str, list[int], Sequence_[Union[str, list[int]]]],
                 sampling_params: Union[None, SamplingParams, list[SamplingParams]] = None,
                 max_new_tokens: Optional[int] = None, chat: Optional[bool] = None, on_tokens=None,
                 progress: bool = False):
        """Generate for one prompt (a string or a list of token ids: returns one Result) or for a
        list of them (all in flight together, continuous batching: returns Results in input
        order, as vLLM's offline LLM.generate). sampling_params: one for all, or one per prompt
        (default: the deployment's `sampling:`). A prompt that cannot run gets a Result with its
        `error` while the others run; a single prompt raises instead."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(plist):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(plist)} prompts")
            sps = list(sampling_params)
        else:
            sps = [sampling_params or self.sp] * len(plist)
        ids = [self.encode(p, chat) if isinstance(p, str) else list(p) for p in plist]
        seqs = []
        for i, (x, sp) in enumerate(zip(ids, sps)):
            why = self.check_prompt(x, sp.max_tokens or max_new_tokens)
            if why and single:
                raise ContextLengthError(why)
            seq = self.sequence(x or [0], sp, max_new_tokens, index=i, on_tokens=on_tokens if single else None)
            if why:
                seq.prompt_ids = x
                seq.finish("error", why)
            seqs.append(seq)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(seqs), desc="requests", unit="req", file=sys.stderr)
        runnable = [s for s in seqs if not s.is_finished]
        if bar:
            bar.update(len(seqs) - len(runnable))
        self.engine.run(runnable, on_finish=(lambda s: bar.update(1)) if bar else None)
        if bar:
            bar.close()
        out = [Result(s.prompt_ids, s.output_ids, self.tokenizer.decode(s.output_ids, skip_special_tokens=True),
                      s.stats, s.finish_reason, s.error) for s in seqs]
        if single and out[0].error:
            raise ContextLengthError(out[0].error)
        return out[0] if single else out
