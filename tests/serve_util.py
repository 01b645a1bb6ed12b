"""Start `python -m quasar.serve` in a subprocess for tests (a real server process on a free
localhost port) and stop it."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_with_tokenizer(root: Path, tokenizer_dir: Path) -> Path:
    """A tiny random llama with SmolLM2's vocabulary, tokenizer and chat template (so served
    text is real byte-level BPE text: multi-byte characters, merges, a chat template)."""
    from tiny import make_tiny
    out = make_tiny(root, "llama", vocab_size=49152, seed=3)
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


class Server:
    def __init__(self, cfg: dict, tmp: Path, *flags: str, env: dict | None = None):
        self.cfg_path = tmp / "deploy.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "server.log"
        self.flags = list(flags)
        self.env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 180.0) -> "Server":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "quasar.serve", "--config", str(self.cfg_path),
                                      "--port", "0", *self.flags], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=REPO)
        t0 = time.time()
        while time.time() - t0 < timeout:
            m = re.search(r"at (http://[\d.]+:\d+)/v1", self.log())
            if m and not self.url:
                self.url = m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            if self.url:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {name{labels}: value}, and by bare name (labels dropped,
        summed) for the unlabelled use."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, val = line.rsplit(" ", 1)
            out[key] = float(val)
            bare = key.split("{")[0]
            if "finished_reason" in key:
                bare += ":" + re.search(r'finished_reason="([^"]*)"', key).group(1)
            out[bare] = out.get(bare, 0.0) + float(val) if bare != key else float(val)
        return out

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
