"""Launch configurations of the weight-streaming GEMM kernels.

A configuration is (BN, SPLIT_K, BK, num_warps, num_stages); BM (the padded row count, the
tl.dot's N dimension after the swap) follows from M: 16 for M <= 16, 32 for M <= 32, else 64
(M > 64 adds programs along M). The heuristic aims at >= 2 programs per SM so that the weight
stream fills HBM at N = 4096: SPLIT_K grows (powers of two) while there are too few
(N-tile x M-tile) programs and every split keeps >= 2 K blocks.

Tuned entries override the heuristic. Like vLLM's per-GPU fused-MoE configs, tables tuned on a GPU
ship in `tuned/` and are used on a GPU whose name matches (`DEFAULT_TABLES`); shapes they do not
cover take the heuristic. The kernel option `tuning` (runtime.kernels.tuning) picks the table:
auto (the shipped one), none, or a JSON file written by `python -m quasar.bench.ops`. Entries set
in this process (`TABLE`, `load_table`; the sweeps) come first.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import triton

from ._common import INTERPRETED

KBLOCK = 256          # K granularity of the packed layouts (and the split-K unit)


@dataclass(frozen=True)
class GemmConfig:
    bn: int = 64            # output features per program
    split_k: int = 1        # programs along K (partials reduced by the last one to finish)
    bk: int = 256           # K per iteration (int8 weights; int4 is always 256 = 4 chunks of 64)
    num_warps: int = 4
    num_stages: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


TABLE: dict[tuple, GemmConfig] = {}


def m_bucket(m: int) -> int:
    for b in (1, 2, 4, 8, 16, 32, 64):
        if m <= b:
            return b
    return 128


def block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


KINDS = ("w8a8_int8", "w8a8_fp8", "int8_a16", "int4_a16", "int4_a4", "bf16")   # one table per kernel variant


def load_table(path: str) -> int:
    """Load tuned configs (the "tuned" list of `python -m quasar.bench.ops` JSON); returns how many."""
    with open(path) as f:
        data = json.load(f)
    rows = data.get("tuned", data) if isinstance(data, dict) else data
    n = 0
    for r in rows:
        cfg = GemmConfig(**r["config"])
        TABLE[(r["kind"], int(r["m_bucket"]), int(r["n"]), int(r["k"]))] = cfg
        n += 1
    return n


# GPU name substring -> table in tuned/ (graph-timed sweeps of `python -m quasar.bench.ops`)
DEFAULT_TABLES = {"H100": "h100.json"}
_FILES: dict[str, dict] = {}


def _read(path: str) -> dict:
    if path not in _FILES:
        with open(path) as f:
            data = json.load(f)
        rows = data.get("tuned", data) if isinstance(data, dict) else data
        _FILES[path] = {(r["kind"], int(r["m_bucket"]), int(r["n"]), int(r["k"])): GemmConfig(**r["config"])
                        for r in rows}
    return _FILES[path]


def default_table_path(device) -> Optional[str]:
    """The shipped table for this GPU, if there is one."""
    device = torch.device(device)
    if device.type != "cuda" or INTERPRETED:
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(key)
    for sub, fname in DEFAULT_TABLES.items():
        path = os.path.join(os.path.dirname(__file__), "tuned", fname)
        if sub in name and os.path.exists(path):
            return path
    return None


def load_default_table(device) -> Optional[str]:
    """The shipped table file for this GPU, read once (None when there is none)."""
    path = default_table_path(device)
    if path is not None:
        _read(path)
    return path


def table_for(device, opts=None) -> dict:
    """The tuned table that option `tuning` selects: auto (the shipped table for this GPU, if
    any), none, or a JSON file of `python -m quasar.bench.ops`."""
    if opts is None:
        from ._common import default_options
        opts = default_options()
    choice = opts.tuning
    if choice == "none":
        return {}
    path = default_table_path(device) if choice == "auto" else choice
    return _read(path) if path else {}


_SMS: dict = {}


def sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda" or INTERPRETED:
        return 8            # the interpreter: few, large programs run fastest
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def split_for(m: int, n: int, k: int, bn: int, device) -> int:
    """SPLIT_K (a power of two <= 16) that gives >= 2 programs per SM while every split keeps
    >= 2 K blocks of 256."""
    kb = triton.cdiv(k, KBLOCK)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, block_m(m))
    target = 2 * sm_count(device)
    split = 1
    while tiles * split < target and kb // (split * 2) >= 2 and split < 16:
        split *= 2
    return split


def heuristic(kind: str, m: int, n: int, k: int, device) -> GemmConfig:
    bm = block_m(m)
    if INTERPRETED or torch.device(device).type != "cuda":
        return GemmConfig(bn=64, split_k=1, bk=256, num_warps=1, num_stages=1)
    if m > 64:
        return GemmConfig(bn=128, split_k=1, bk=128, num_warps=8 if bm == 64 else 4, num_stages=3)
    # BN 64, BK 256, 3 stages: the most frequent winner of the graph-timed H100 sweep (BK 256
    # beat 128 for the int8 kernel by 5..15%; BN 128 lost on the wide gate_up projections)
    bn = 64
    return GemmConfig(bn=bn, split_k=split_for(m, n, k, bn, device), bk=256, num_warps=4, num_stages=3)


def tuned(kind: str, m: int, n: int, k: int, device, opts=None) -> Optional[GemmConfig]:
    """The tuned entry, if any: TABLE (entries set in this process: load_table, the sweeps), then
    the table option `tuning` selects."""
    key = (kind, m_bucket(m), n, k)
    hit = TABLE.get(key)
    return hit if hit is not None else table_for(device, opts).get(key)


def pick(kind: str, m: int, n: int, k: int, device, config: Optional[GemmConfig] = None,
         opts=None) -> GemmConfig:
    if config is not None:
        return config
    hit = tuned(kind, m, n, k, device, opts)
    return hit if hit is not None else heuristic(kind, m, n, k, device)


def split_plan(m: int, n: int, nkb: int, cfg: GemmConfig, out: torch.Tensor, int_partials: bool):
    """The split-K launch shared by the weight-streaming GEMMs: at most cfg.split_k programs along
    K, each taking `per` of the nkb K blocks (no empty splits); with split > 1, the workspace of
    partial sums (int32 for integer dots) and the tile counters. Returns (grid, per, split, ws, cnt)."""
    split = max(1, min(cfg.split_k, nkb))
    per = triton.cdiv(nkb, split)
    split = triton.cdiv(nkb, per)
    grid = (triton.cdiv(n, cfg.bn), split, triton.cdiv(m, block_m(m)))
    if split > 1:
        ws = torch.empty(split * m * n, dtype=torch.int32 if int_partials else torch.float32, device=out.device)
        cnt = counters(out.device)
        assert grid[0] * grid[2] <= cnt.numel()
    else:
        ws, cnt = out, out
    return grid, per, split, ws, cnt


# ------------------------------------------------------------------ split-K tile counters

_COUNTERS: dict = {}
MAX_TILES = 1 << 16


def counters(device) -> torch.Tensor:
    """A zeroed int32 buffer per device: one arrival counter per output tile of a split-K GEMM.
    Each launch leaves it zeroed again (the last program of a tile resets its counter), so it is
    allocated once (at weight preparation, before any CUDA graph capture) and reused."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]
