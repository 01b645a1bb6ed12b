#!/usr/bin/env python
"""Quantize a Hugging Face checkpoint offline with llmcompressor into a compressed-tensors
directory that both Quasar and transformers load.

    python tools/quantize.py --model DIR --recipe w8a8-smoothquant-gptq \\
        --calib /path/to/specbench/question.jsonl [--num-samples 512] [--max-seq-len 2048] \\
        [--out DIR] [--group-size 128]

Recipes (lm_head is always left out and stays in the model dtype):
  w8a8-smoothquant-gptq  SmoothQuant (strength 0.8) + GPTQ, preset W8A8: int8 symmetric
                         per-output-channel weights, dynamic per-token int8 activations
                         -> Quasar's w8a8-int8
  w4a16-gptq             GPTQ, preset W4A16: int4 symmetric weights in groups of --group-size
                         along K (128; -1 = per channel) -> w4a16
  w4a16-awq-asym         AWQ + preset W4A16_ASYM: int4 asymmetric weights (zero points), groups
                         of --group-size -> w4a16

Calibration prompts come from a JSONL file, one object per line: Spec-Bench's
{"question_id", "category", "turns": [...]} (the first turn is used), or {"prompt": ...}, or
{"text": ...}. Prompts are wrapped in the tokenizer's chat template when it has one. Nothing is
downloaded: the model directory must hold the weights and the tokenizer.

Runs on the GPU when there is one (llmcompressor moves one layer at a time onto it), else on the
CPU. Errors in the inputs print `error: ...` and exit with status 2; a failure inside
llmcompressor exits with 1 (--debug shows its traceback).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

RECIPES = {
    "w8a8-smoothquant-gptq": "SmoothQuant + GPTQ, W8A8 (int8 per-channel weights, dynamic per-token int8 activations)",
    "w4a16-gptq": "GPTQ, W4A16 (int4 symmetric weights, groups of --group-size)",
    "w4a16-awq-asym": "AWQ, W4A16_ASYM (int4 asymmetric weights with zero points, groups of --group-size)",
}
PRESET = {"w8a8-smoothquant-gptq": "W8A8", "w4a16-gptq": "W4A16", "w4a16-awq-asym": "W4A16_ASYM"}
SMOOTHING_STRENGTH = 0.8
IGNORE = ["lm_head"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class UsageError(Exception):
    """A problem with the inputs: printed as `error: ...`, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):     # argparse's own errors: same shape, same status
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        prog="tools/quantize.py",
        description="Quantize a Hugging Face model with llmcompressor (offline) into a\n"
                    "compressed-tensors directory that Quasar and transformers load.",
        epilog="recipes:\n" + "\n".join(f"  {k:24s}{v}" for k, v in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="local Hugging Face model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--recipe", required=True, metavar="RECIPE",
                   help="one of: " + ", ".join(RECIPES))
    p.add_argument("--calib", required=True, metavar="FILE.jsonl",
                   help="calibration prompts, JSONL (Spec-Bench question.jsonl, or {'prompt'|'text': ...})")
    p.add_argument("--num-samples", type=int, default=512,
                   help="calibration prompts to use (default 512; fewer if the file has fewer)")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="truncate each calibration prompt to this many tokens (default 2048)")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4 group size along K for the w4a16 recipes (default 128; -1 = per channel)")
    p.add_argument("--out", default=None,
                   help="output directory (default: <model dir>-<recipe> next to the model)")
    p.add_argument("--awq-grid", type=int, default=20,
                   help="AWQ: scale candidates tried per layer (llmcompressor's n_grid, default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample choice")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs

def check_args(a: argparse.Namespace) -> tuple[Path, Path, Path]:
    if a.recipe not in RECIPES:
        raise UsageError(f"unknown recipe {a.recipe!r}; choose one of: {', '.join(RECIPES)}")
    model = Path(a.model).expanduser()
    if not model.exists():
        raise UsageError(f"model directory {model} does not exist")
    if not model.is_dir():
        raise UsageError(f"--model {model} is not a directory (give a local Hugging Face model "
                         "directory; convert a .gguf first, e.g. with quasar.model.loader.resolve_model)")
    if not (model / "config.json").is_file():
        raise UsageError(f"{model} has no config.json: not a Hugging Face model directory")
    if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
        raise UsageError(f"{model} holds no weights (*.safetensors)")
    # transformers 5 builds an *empty* tokenizer from config.json alone, so look for the files.
    if not any((model / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"cannot load a tokenizer from {model}: none of {', '.join(TOKENIZER_FILES)} "
                         "is there; the model directory must include its tokenizer files")
    qc = json.loads((model / "config.json").read_text()).get("quantization_config")
    if qc:
        raise UsageError(f"{model} is already quantized ({qc.get('quant_method')}); quantize the "
                         "bf16 / fp16 checkpoint")
    calib = Path(a.calib).expanduser()
    if not calib.is_file():
        raise UsageError(f"calibration file {calib} does not exist" if not calib.exists()
                         else f"calibration file {calib} is not a file")
    if a.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1 (got {a.num_samples})")
    if a.max_seq_len < 2:
        raise UsageError(f"--max-seq-len must be at least 2 (got {a.max_seq_len})")
    if a.awq_grid < 1:
        raise UsageError(f"--awq-grid must be at least 1 (got {a.awq_grid})")
    if a.group_size != -1 and a.group_size < 1:
        raise UsageError(f"--group-size must be a positive group size or -1 (got {a.group_size})")
    if a.recipe.startswith("w4") and a.group_size != -1:
        _check_group_size(model, a.group_size)
    out = Path(a.out).expanduser() if a.out else model.parent / f"{model.name}-{a.recipe}"
    if out.resolve() == model.resolve():
        raise UsageError("--out must differ from --model (the float checkpoint is kept)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.force:
        raise UsageError(f"output {out} already exists and is not empty; pass --force to replace it")
    return model, calib, out


def _check_group_size(model: Path, gs: int) -> None:
    """Every decoder Linear's in-features must be a multiple of the group size (Quasar and the
    int4 kernels need whole groups)."""
    c = json.loads((model / "config.json").read_text())
    c = c.get("text_config", c)
    h, inter = c.get("hidden_size"), c.get("intermediate_size")
    heads = c.get("num_attention_heads")
    hd = c.get("head_dim") or (h // heads if h and heads else None)
    ks = {"hidden_size": h, "intermediate_size": inter,
          "num_attention_heads * head_dim": heads * hd if heads and hd else None}
    bad = [f"{k} = {v}" for k, v in ks.items() if v and v % gs]
    if bad:
        raise UsageError(f"--group-size {gs} does not divide the in-features of every Linear "
                         f"({', '.join(bad)}); pick a divisor, or -1 for per-channel scales")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file: Spec-Bench (first turn), {"prompt": ...} or {"text": ...}."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            if "turns" in obj:
                turns = obj["turns"]
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                    raise UsageError(f"{path}:{i}: 'turns' must be a non-empty list of strings")
                text = turns[0]
            elif "prompt" in obj or "text" in obj:
                text = obj.get("prompt", obj.get("text"))
                if not isinstance(text, str):
                    raise UsageError(f"{path}:{i}: 'prompt' / 'text' must be a string")
            else:
                raise UsageError(f"{path}:{i}: no 'turns', 'prompt' or 'text' field "
                                 f"(keys: {', '.join(obj) or 'none'})")
            if text.strip():
                prompts.append(text)
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def choose(prompts: list[str], n: int, seed: int) -> list[str]:
    """n prompts, a seeded shuffle (Spec-Bench is sorted by category: a prefix would be one task)."""
    if n >= len(prompts):
        return list(prompts)
    idx = list(range(len(prompts)))
    random.Random(seed).shuffle(idx)
    return [prompts[i] for i in sorted(idx[:n])]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise UsageError(f"cannot load a tokenizer from {model_dir} ({type(e).__name__}: {e}); the "
                         "model directory must include its tokenizer files") from None
    if len(tok) < 2:
        raise UsageError(f"the tokenizer in {model_dir} has an empty vocabulary; the model directory "
                         "must include its tokenizer files")
    return tok


def tokenize(tok, prompts: list[str], max_len: int):
    """An in-memory datasets.Dataset of input_ids / attention_mask (chat template if any)."""
    from datasets import Dataset
    from tqdm.auto import tqdm
    chat = bool(getattr(tok, "chat_template", None))
    ids, masks = [], []
    for p in tqdm(prompts, desc="tokenizing calibration prompts", unit="prompt"):
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(text, add_special_tokens=False, truncation=True, max_length=max_len)
        else:
            enc = tok(p, truncation=True, max_length=max_len)
        if len(enc["input_ids"]) == 0:
            continue
        ids.append(list(enc["input_ids"]))
        masks.append([1] * len(enc["input_ids"]))
    if not ids:
        raise UsageError("no calibration prompt tokenizes to a non-empty sequence")
    return Dataset.from_dict({"input_ids": ids, "attention_mask": masks}), chat


# ----------------------------------------------------------------------------- llmcompressor

def import_llmcompressor():
    try:
        import llmcompressor  # noqa: F401
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier
        from compressed_tensors.quantization import preset_name_to_scheme
    except ImportError as e:
        raise UsageError(f"llmcompressor is not installed ({e}); install it with "
                         "pip install 'quasar[quant]'") from None
    return dict(oneshot=oneshot, GPTQModifier=GPTQModifier, QuantizationModifier=QuantizationModifier,
                AWQModifier=AWQModifier, SmoothQuantModifier=SmoothQuantModifier,
                preset_name_to_scheme=preset_name_to_scheme)


def build_recipe(name: str, group_size: int, lc: dict, awq_grid: int = 20) -> list:
    """The llmcompressor modifiers for a recipe name (lm_head ignored)."""
    preset = PRESET[name]
    if name == "w8a8-smoothquant-gptq":
        return [lc["SmoothQuantModifier"](smoothing_strength=SMOOTHING_STRENGTH),
                lc["GPTQModifier"](targets="Linear", scheme=preset, ignore=IGNORE)]
    scheme = lc["preset_name_to_scheme"](preset, ["Linear"])
    if group_size == -1:
        scheme.weights.strategy, scheme.weights.group_size = "channel", None
    else:
        scheme.weights.group_size = group_size
    groups = {"group_0": scheme}
    if name == "w4a16-gptq":      # actorder stays 'static': contiguous groups, no g_idx
        return [lc["GPTQModifier"](config_groups=groups, ignore=IGNORE)]
    if name == "w4a16-awq-asym":
        return [lc["AWQModifier"](n_grid=awq_grid), lc["QuantizationModifier"](config_groups=groups, ignore=IGNORE)]
    raise UsageError(f"unknown recipe {name!r}")


def _cpu_only_workarounds() -> None:
    """llmcompressor 0.14's AWQ pins its activation cache to host memory for faster uploads,
    which raises 'Cannot access accelerator device when none is available' on a machine with no
    accelerator. Pinning only speeds up host->device copies, so skip it there."""
    import torch
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        return
    try:
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError:
        return
    if hasattr(IntermediatesCache, "pin_memory"):
        IntermediatesCache.pin_memory = lambda self, *a, **k: None


def quantize(a: argparse.Namespace) -> Path:
    model_dir, calib, out = check_args(a)
    prompts = read_prompts(calib)
    lc = import_llmcompressor()
    tok = load_tokenizer(model_dir)
    import torch
    from transformers import AutoModelForCausalLM

    picked = choose(prompts, a.num_samples, a.seed)
    print(f"[quantize] {model_dir} -> {out}\n[quantize] recipe {a.recipe}: {RECIPES[a.recipe]}\n"
          f"[quantize] calibration: {len(picked)} of {len(prompts)} prompts from {calib}, "
          f"<= {a.max_seq_len} tokens each", flush=True)
    ds, chat = tokenize(tok, picked, a.max_seq_len)
    lens = [len(x) for x in ds["input_ids"]]
    print(f"[quantize] {len(lens)} samples, {sum(lens)} tokens (mean {sum(lens) / len(lens):.0f}, "
          f"max {max(lens)}){', chat template applied' if chat else ''}", flush=True)

    recipe = build_recipe(a.recipe, a.group_size, lc, a.awq_grid)
    _cpu_only_workarounds()
    t0 = time.time()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    except Exception as e:
        raise UsageError(f"transformers cannot load the model in {model_dir} "
                         f"({type(e).__name__}: {e})") from None
    model.eval()
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    print(f"[quantize] model loaded ({model.dtype}); calibrating on {accel or 'cpu'}", flush=True)
    model = lc["oneshot"](model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ds),
                          max_seq_length=a.max_seq_len, shuffle_calibration_samples=False)
    if out.exists() and a.force:
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))
    return _report(out, time.time() - t0)


def _report(out: Path, seconds: float) -> Path:
    """Check the directory is one Quasar reads, and say what was written."""
    from quasar.quant.compressed_tensors import checkpoint_scheme
    cfg = json.loads((out / "config.json").read_text())
    scheme = checkpoint_scheme(cfg, out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    qc = cfg["quantization_config"]
    print(f"[quantize] wrote {out} in {seconds:.0f} s: compressed-tensors {qc.get('format')}, "
          f"{size / 2**20:.1f} MiB of weights; Quasar scheme {scheme}, ignored: {qc.get('ignore')}")
    print(f"[quantize] run it: python -m quasar.run --model {out}")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        quantize(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:   # inside llmcompressor / transformers
        if a.debug:
            raise
        from quasar.errors import QuasarError
        if isinstance(e, QuasarError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"error: quantization failed ({type(e).__name__}: {e}); rerun with --debug for the "
              "traceback", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
