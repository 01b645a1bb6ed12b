"""GGUF -> a standard Hugging Face directory (safetensors), converted once via transformers and
cached under $QUASAR_CACHE/gguf/. Needs the `gguf` package (pip install 'quasar[gguf]')."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from quasar.errors import CheckpointError


def cache_root() -> Path:
    return Path(os.environ.get("QUASAR_CACHE", "~/.cache/quasar")).expanduser()


def _key(f: Path) -> str:
    st = f.stat()
    return hashlib.sha1(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def convert(gguf_file: Path, out_dir: Path, tokenizer_overrides: Optional[dict] = None) -> Path:
    """Dequantize a GGUF with transformers and write config.json + model.safetensors + tokenizer.
    Writes to a temporary directory first, so an interrupted conversion leaves no half cache."""
    for mod in ("gguf", "accelerate"):      # transformers needs both to load a GGUF
        try:
            __import__(mod)
        except ImportError:
            raise CheckpointError(f"reading GGUF files needs the {mod} package: pip install "
                                  f"'quasar[gguf]' (or pip install gguf accelerate)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise CheckpointError(f"GGUF file {gguf_file} does not exist")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except Exception as e:
        raise CheckpointError(f"{gguf_file}: transformers could not read this GGUF ({type(e).__name__}: "
                              f"{e}); it may be corrupt or of an unsupported architecture") from None
    # The GGUF quantizer marks the model as non-serializable; the weights are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(tmp), safe_serialization=True)
    for k, v in (tokenizer_overrides or {}).items():
        setattr(tok, k, v)
    tok.save_pretrained(str(tmp))
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def convert_cached(gguf_file: Path, tokenizer_overrides: Optional[dict] = None) -> Path:
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise CheckpointError(f"GGUF file {gguf_file} does not exist")
    out = cache_root() / "gguf" / f"{gguf_file.stem}-{_key(gguf_file)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert(gguf_file, out, tokenizer_overrides)
