"""CPU threads for torch (`runtime.threads`, `--threads`).

torch's default (one thread per core) collapses when another process is busy on the same cores:
intra-op threads spin-wait on each other. The default here is measured on the 2-core dev machine
(see the README's "CPU threads" paragraph)."""
from __future__ import annotations

import os
from typing import Optional

import torch


_override: Optional[int] = None


def set_default(threads: Optional[int]) -> None:
    """A CLI's --threads: the count used where a config leaves runtime.threads null (None: the
    built-in default below)."""
    global _override
    _override = None if threads is None else int(threads)


def default_threads() -> int:
    if _override is not None:
        return _override
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def apply(threads: Optional[int]) -> int:
    """Set torch's intra-op thread count: `threads`, or the default when None. Returns it."""
    n = default_threads() if threads is None else int(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
