"""A fake ``torch_npu`` for tests: the documented semantics of the ops Quasar's NPU backend uses,
in plain torch on the CPU. TEST-ONLY. It is never importable as ``torch_npu`` unless a test puts
it into ``sys.modules`` (``tests/npu_emulation.emulated_torch_npu``).

Every op follows the torch_npu API reference (Ascend/op-plugin ``docs/context/torch_npu-<op>.md``,
the same text as hiascend.com "torch_npu.<op>"), and reproduces what the backend can get wrong:
argument layouts, the dtype-combination tables (raising where the documented op rejects the
combination), the int4 nibble order, the attention-mask polarity, the group-size and K/N limits,
and ``output_dtype``. Where the documentation is silent the emulation picks the conservative
reading and says so in the op's docstring ("Assumption: ...") -- those are exactly the points to
confirm on hardware (docs/ascend.md lists them).

What it does not emulate (raises ``NotImplementedError`` so that a backend change that starts to
depend on it fails loudly): int4 (int32-packed) activations, ``npu_trans_quant_param`` int64
scales, output quantization (``quant_scale``), FRACTAL_NZ formats, the compressed 2048x2048 causal
masks of sparse_mode 2/3/4, KV-cache antiquant, TND layouts. Page attention (``block_table``) is
emulated for float16 / bfloat16 KV in the two documented cache layouts, with its documented
constraints (see npu_fused_infer_attention_score).

Errors are ``RuntimeError`` (what torch_npu raises when an aclnn parameter check fails).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import npu  # noqa: F401  (torch_npu.npu: is_available, synchronize, device_count)

_quasar_emulation = True
__version__ = "0.0.0+quasar.emulation"

INT_MAX = 2147483647
_LAST_DIM_LIMIT = 65535        # npu_quant_matmul: x1 / x2 last dim <= 65535; WQBMM: K, N in [1, 65535]


def _fail(op: str, msg: str):
    raise RuntimeError(f"[emulated torch_npu] {op}: {msg}")


def _unsupported(op: str, what: str):
    raise NotImplementedError(f"[emulated torch_npu] {op}: {what} is not emulated (Quasar does not use it)")


def _dt(t) -> str:
    return "None" if t is None else str(t.dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------- int4 pack

def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """torch_npu.npu_convert_weight_to_int4pack(weight, inner_k_tiles=0) -> Tensor

    Doc: op-plugin docs/context/torch_npu-npu_convert_weight_to_int4pack.md ("参数说明": weight int32,
    ND, contiguous, 2-D (k, n) or (n, k), last dim 8-aligned, values in [-8, 7]; "返回值说明": int32
    (k, n/8)), and the packing itself from the host-side implementation the op calls,
    hicann/ops-nn matmul/convert_weight_to_int4_pack/op_host/op_api/
    aclnn_convert_weight_to_int4_pack.cpp (``PackToINT8``: byte i = (w[2i+1] & 0xF) << 4 |
    (w[2i] & 0xF); bytes are stored in order, so in a little-endian int32 word the element
    8*j + e of a row sits at bits [4e, 4e + 4)).
    Assumption: values outside [-8, 7] are masked by the real op; the emulation raises instead
    (the doc says they "must be" in range, and an out-of-range code here is always a bug).
    """
    op = "npu_convert_weight_to_int4pack"
    if weight.dtype != torch.int32:
        _fail(op, f"weight must be int32, got {_dt(weight)}")
    if weight.dim() != 2:
        _fail(op, f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        _fail(op, "weight must be contiguous")
    d0, d1 = weight.shape
    if d1 % 8:
        _fail(op, f"the last dim of weight ({d1}) must be a multiple of 8")
    if weight.numel() and (int(weight.min()) < -8 or int(weight.max()) > 7):
        _fail(op, "weight values must be in the int4 range [-8, 7]")
    nib = (weight.to(torch.int64) & 0xF).view(d0, d1 // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=weight.device)
    word = (nib << shifts).sum(-1)                              # disjoint bits: sum == or
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)   # as two's complement int32
    return word.to(torch.int32)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of npu_convert_weight_to_int4pack along the last dim -> int8 codes in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    nib = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    nib = torch.where(nib >= 8, nib - 16, nib)
    return nib.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(torch.int8)


# ------------------------------------------------------------------------------ dynamic quant

def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales=None, group_index=None, dst_type=None):
    """torch_npu.npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None)
    -> (y, scale)

    Doc: op-plugin docs/context/torch_npu-npu_dynamic_quant.md: per-token symmetric dynamic
    quantization; x float16 / bfloat16 only, dim > 1; dst_type None = int8; returns y (shape of x,
    int8) and scale (float32, shape of x without its last dim), scale = rowMax(|x|) / DTYPE_MAX,
    y = round(x / scale).
    Assumptions: the row max and the division are computed in fp32 and the rounding is
    round-half-to-even (torch.round); an all-zero row gives scale 0 and y 0.
    """
    op = "npu_dynamic_quant"
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail(op, f"x must be float16 or bfloat16, got {_dt(x)}")
    if x.dim() < 2:
        _fail(op, f"x must have more than 1 dim, got shape {tuple(x.shape)}")
    if smooth_scales is not None or group_index is not None:
        _unsupported(op, "smooth_scales / group_index")
    if dst_type not in (None, torch.int8):
        _unsupported(op, f"dst_type={dst_type}")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-128, 127)
    y = torch.where(scale.unsqueeze(-1) > 0, y, torch.zeros_like(y))
    return y.to(torch.int8), scale


# ------------------------------------------------------------------------------- quant matmul

# Doc "约束说明" table 2 (Atlas A2 / A3), rows with int8 x1/x2:
#   (scale dtypes, offset dtypes, bias dtypes, pertoken dtypes, output_dtype)
_QMM_ROWS = [
    ({"int64", "float32"}, {"None"}, {"int32", "None"}, {"None"}, "float16"),
    ({"int64", "float32"}, {"float32", "None"}, {"int32", "None"}, {"None"}, "int8"),
    ({"float32", "bfloat16"}, {"None"}, {"int32", "bfloat16", "float32", "None"}, {"float32", "None"}, "bfloat16"),
    ({"float32"}, {"None"}, {"int32", "bfloat16", "float32", "None"}, {"float32"}, "float16"),
    ({"float32", "bfloat16"}, {"None"}, {"int32", "None"}, {"None"}, "int32"),
]


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset=None,
                     pertoken_scale=None, bias=None, output_dtype=None, group_sizes=None):
    """torch_npu.npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
    output_dtype=None, group_sizes=None) -> Tensor

    Doc: op-plugin docs/context/torch_npu-npu_quant_matmul.md:
    - "功能说明" formulas: out = x1 @ x2 * scale (+ offset); bias int32 is added to the int32
      accumulator before scaling; bias bfloat16/float16/float32 is added after; with pertoken_scale
      (hicann/ops-nn quant_batch_matmul_v4 README): out = x1 @ x2 * scale * pertoken_scale + bias.
    - "参数说明": x1 [.., m, k], x2 [.., k, n] (ND, 2-6 dims, same dtype); scale 1-D (1,) or (n,);
      pertoken_scale float32 1-D (m,); bias 1-D (n,) (or (batch, 1, n)); output_dtype None = int8.
    - "约束说明": the last dim of x1 and of x2 must not exceed 65535; the dtype combinations of
      table 2 (Atlas A2/A3), enforced here row by row.
    Int8 x int8 only (int32-packed int4 operands and int64 scales are not emulated). The int32
    accumulation is exact (float64 holds every int32 partial sum); the dequantisation is fp32.
    """
    op = "npu_quant_matmul"
    if not (2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6):
        _fail(op, f"x1/x2 must have 2-6 dims, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.dtype != x2.dtype:
        _fail(op, f"x1 and x2 must have the same dtype, got {_dt(x1)} and {_dt(x2)}")
    if x1.dtype == torch.int32:
        _unsupported(op, "int32-packed int4 operands")
    if x1.dtype != torch.int8:
        _fail(op, f"x1/x2 must be int8 (or int32-packed int4), got {_dt(x1)}")
    k, n = x2.shape[-2], x2.shape[-1]
    if x1.shape[-1] != k:
        _fail(op, f"x1 k ({x1.shape[-1]}) != x2 k ({k}); x2 must be laid out [k, n]")
    if x1.shape[-1] > _LAST_DIM_LIMIT or n > _LAST_DIM_LIMIT:
        _fail(op, f"the last dim of x1 ({x1.shape[-1]}) and of x2 ({n}) must not exceed 65535")
    if scale.dim() != 1 or scale.shape[0] not in (1, n):
        _fail(op, f"scale must be 1-D (1,) or (n={n},), got {tuple(scale.shape)}")
    if scale.dtype == torch.int64:
        _unsupported(op, "int64 (npu_trans_quant_param) scales")
    m = x1.shape[-2]
    if pertoken_scale is not None:
        if pertoken_scale.dim() != 1 or pertoken_scale.shape[0] != m:
            _fail(op, f"pertoken_scale must be 1-D (m={m},), got {tuple(pertoken_scale.shape)}")
    if bias is not None and not (bias.dim() == 1 and bias.shape[0] == n):
        if not (bias.dim() == 3 and bias.shape[1] == 1 and bias.shape[2] == n):
            _fail(op, f"bias must be (n={n},) or (batch, 1, n), got {tuple(bias.shape)}")
    out_name = "int8" if output_dtype is None else str(output_dtype).replace("torch.", "")
    combo = (_dt(scale), _dt(offset), _dt(bias), _dt(pertoken_scale))
    if not any(combo[0] in r[0] and combo[1] in r[1] and combo[2] in r[2] and combo[3] in r[3]
               and out_name == r[4] for r in _QMM_ROWS):
        _fail(op, f"unsupported dtype combination (scale, offset, bias, pertoken_scale, output_dtype) = "
                  f"{combo + (out_name,)}; see the dtype table of the torch_npu docs")
    if out_name == "int32":
        _unsupported(op, "output_dtype=torch.int32")
    acc = torch.matmul(x1.double(), x2.double())              # exact int32 accumulation
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.double()
    y = acc.float() * scale.float()
    if pertoken_scale is not None:
        y = y * pertoken_scale.float().unsqueeze(-1)
    if offset is not None:
        y = y + offset.float()
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.float()
    if out_name == "int8":
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    return y.to(getattr(torch, out_name))


# ------------------------------------------------------------------- weight-quant batchmatmul

def npu_weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                                 antiquant_offset: Optional[torch.Tensor] = None, quant_scale=None,
                                 quant_offset=None, bias: Optional[torch.Tensor] = None,
                                 antiquant_group_size: int = 0, inner_precise: int = 0) -> torch.Tensor:
    """torch_npu.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None,
    quant_scale=None, quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0)

    Doc: op-plugin docs/context/torch_npu-npu_weight_quant_batchmatmul.md:
    - "功能说明": y = x @ ANTIQUANT(weight) + bias, ANTIQUANT(weight) = (weight + antiquant_offset)
      * antiquant_scale (the offset is ADDED, so an asymmetric zero point z is passed as -z).
    - "参数说明": x (M, K) float16/bfloat16; weight (K, N) int8, or int32 carrying int4 as
      (K, N/8) from npu_convert_weight_to_int4pack; antiquant_scale per-tensor (1,)/(1, 1),
      per-channel (1, N)/(N,), per-group (ceil(K / group), N), dtype equal to x's (float16 /
      bfloat16); antiquant_offset the same shape and dtype as antiquant_scale; bias (N,)/(1, N),
      float32 when x is bfloat16 and float16 when x is float16; antiquant_group_size 0, or for
      per-group in [32, K-1] and a multiple of 32.
    - "约束说明": K, N in [1, 65535]; antiquant_scale and antiquant_offset have the same shape.
    Returns x.dtype. Assumption: the weight is dequantised in fp32, rounded to x's dtype (the cube
    unit's input type), and accumulated in fp32.
    """
    op = "npu_weight_quant_batchmatmul"
    if quant_scale is not None or quant_offset is not None:
        _unsupported(op, "output quantization (quant_scale / quant_offset)")
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail(op, f"x must be float16 or bfloat16, got {_dt(x)}")
    if x.dim() != 2 or weight.dim() != 2:
        _fail(op, f"x and weight must be 2-D (M, K) and (K, N), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype == torch.int8:
        w = weight
    elif weight.dtype == torch.int32:
        w = _unpack_int4(weight.contiguous())                   # (K, N/8) int32 -> (K, N) codes
    else:
        _fail(op, f"weight must be int8 or int32 (packed int4), got {_dt(weight)}")
    m, k = x.shape
    if w.shape[0] != k:
        _fail(op, f"x k ({k}) != weight k ({w.shape[0]}); weight must be laid out (K, N)")
    n = w.shape[1]
    if not (1 <= k <= _LAST_DIM_LIMIT and 1 <= n <= _LAST_DIM_LIMIT):
        _fail(op, f"K ({k}) and N ({n}) must be in [1, 65535]")
    if antiquant_scale.dtype == torch.int64:
        _unsupported(op, "int64 antiquant_scale")
    if antiquant_scale.dtype != x.dtype:
        _fail(op, f"antiquant_scale dtype ({_dt(antiquant_scale)}) must equal x dtype ({_dt(x)})")
    g = antiquant_group_size
    s = antiquant_scale
    if g:
        if g < 32 or g > k - 1 or g % 32:
            _fail(op, f"antiquant_group_size must be in [32, K-1] = [32, {k - 1}] and a multiple of 32, got {g}")
        groups = math.ceil(k / g)
        if tuple(s.shape) != (groups, n):
            _fail(op, f"per-group antiquant_scale must be (ceil(K/group), N) = ({groups}, {n}), got {tuple(s.shape)}")
        expand = lambda t: t.float().repeat_interleave(g, dim=0)[:k]          # noqa: E731
    else:
        if tuple(s.shape) in ((1,), (1, 1)):
            expand = lambda t: t.float().reshape(1, 1)                         # noqa: E731
        elif tuple(s.shape) in ((n,), (1, n)):
            expand = lambda t: t.float().reshape(1, n)                         # noqa: E731
        else:
            _fail(op, f"antiquant_scale must be (1,), (1, 1), (N,) or (1, N) with antiquant_group_size 0, "
                      f"got {tuple(s.shape)}")
    wf = w.float()
    if antiquant_offset is not None:
        if tuple(antiquant_offset.shape) != tuple(s.shape):
            _fail(op, f"antiquant_offset shape {tuple(antiquant_offset.shape)} != antiquant_scale shape {tuple(s.shape)}")
        if antiquant_offset.dtype != s.dtype:
            _fail(op, f"antiquant_offset dtype ({_dt(antiquant_offset)}) must equal antiquant_scale dtype ({_dt(s)})")
        wf = wf + expand(antiquant_offset)
    wdq = (wf * expand(s)).to(x.dtype)
    y = x.float() @ wdq.float()
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        if bias.dtype != want:
            _fail(op, f"bias must be {_dt(torch.empty(0, dtype=want))} when x is {_dt(x)}, got {_dt(bias)}")
        if tuple(bias.shape) not in ((n,), (1, n)):
            _fail(op, f"bias must be (N,) or (1, N), got {tuple(bias.shape)}")
        y = y + bias.float().reshape(1, n)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------ attention

_LAYOUTS = ("BNSD", "BSND", "BSH")
_PA_PROMPT_BLOCK = (128, 512, 128)     # Q_S > 1 page attention: block_size in [128, 512], multiple of 128
_PA_DECODE_ALIGN = 16                  # Q_S == 1 page attention, float16 / bfloat16 KV: 16-aligned
_PA_BSH_LIMIT = 65535                  # (blocknum, blocksize, H) layout: KV_N * D <= 65535


def _paged_kv(op, q, key, value, block_table, block_size, actual_seq_lengths_kv, input_layout, hkv,
              atten_mask):
    """Page attention's key/value as BNSD [B, KV_N, maxBlockNumPerSeq * block_size, D], gathered
    through block_table exactly as the documentation describes (see npu_fused_infer_attention_score),
    after checking its constraints. Returns (k, v, KV_S)."""
    b, sq = q.shape[0], q.shape[2]
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
        got = _dt(block_table) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        _fail(op, f"block_table must be an int32 tensor, got {got}")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        _fail(op, f"block_table must be 2-D with first dim == B ({b}), got shape {tuple(block_table.shape)}")
    if actual_seq_lengths_kv is None:
        _fail(op, "page attention (block_table) requires actual_seq_lengths_kv")
    bs = int(block_size)
    if sq > 1:
        lo, hi, mult = _PA_PROMPT_BLOCK
        if not (lo <= bs <= hi and bs % mult == 0):
            _fail(op, f"page attention with Q_S > 1 needs block_size a multiple of {mult} in [{lo}, {hi}], got {bs}")
    elif bs <= 0 or bs % _PA_DECODE_ALIGN:
        _fail(op, f"page attention with Q_S == 1 and float16/bfloat16 KV needs a {_PA_DECODE_ALIGN}-aligned "
                  f"block_size, got {bs}")
    if key.dim() == 4:
        if input_layout not in ("BNSD", "TND"):
            _fail(op, f"a (blocknum, KV_N, blocksize, D) cache needs the query input_layout BNSD or TND, "
                      f"got {input_layout} (BSH/BSND take only (blocknum, blocksize, H))")
        nblk, kvn, kbs, dk = key.shape
        if kvn != hkv or kbs != bs:
            _fail(op, f"key cache {tuple(key.shape)} is not (blocknum, KV_N={hkv}, block_size={bs}, D)")
        pool_k, pool_v = key, value                                    # [blocknum, KV_N, bs, D]
    elif key.dim() == 3:
        nblk, kbs, hh = key.shape
        if kbs != bs or hh % hkv:
            _fail(op, f"key cache {tuple(key.shape)} is not (blocknum, block_size={bs}, H = KV_N*D)")
        if hh > _PA_BSH_LIMIT:
            _fail(op, f"a (blocknum, blocksize, H) cache needs KV_N*D <= {_PA_BSH_LIMIT}, got {hh}; use the "
                      "(blocknum, KV_N, blocksize, D) layout or fewer KV heads")
        pool_k = key.view(nblk, bs, hkv, hh // hkv).transpose(1, 2)
        pool_v = value.view(nblk, bs, hkv, hh // hkv).transpose(1, 2)
    else:
        _fail(op, f"a page-attention key cache must be 3-D or 4-D, got shape {tuple(key.shape)}")
    lens = [int(x) for x in actual_seq_lengths_kv]
    if len(lens) == 1:
        lens = lens * b
    elif len(lens) < b:
        _fail(op, f"actual_seq_lengths_kv needs 1 or >= B entries, got {len(lens)}")
    lens = lens[:b]
    if min(lens) < 0:
        _fail(op, f"actual_seq_lengths_kv must be >= 0, got {lens}")
    need = [-(-n // bs) for n in lens]
    max_blocks = max(need)
    if block_table.shape[1] < max_blocks:
        _fail(op, f"block_table's second dim ({block_table.shape[1]}) is below maxBlockNumPerSeq ({max_blocks})")
    if nblk < sum(need):
        _fail(op, f"blocknum ({nblk}) is below the blocks the sequences need ({sum(need)})")
    kv_s = max_blocks * bs
    if atten_mask is not None and atten_mask.shape[-1] < kv_s:
        _fail(op, f"with page attention the atten_mask KV_S ({atten_mask.shape[-1]}) must be >= "
                  f"maxBlockNumPerSeq * block_size ({kv_s})")
    d = pool_k.shape[-1]
    k = torch.zeros(b, hkv, kv_s, d, dtype=key.dtype, device=key.device)
    v = torch.zeros_like(k)
    for i in range(b):
        ids = block_table[i, :need[i]].to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= nblk):
            _fail(op, f"batch {i}: block ids {ids.tolist()} outside [0, blocknum={nblk}) (undefined on hardware)")
        n = need[i] * bs
        k[i, :, :n] = pool_k[ids].transpose(0, 1).reshape(hkv, n, d)
        v[i, :, :n] = pool_v[ids].transpose(0, 1).reshape(hkv, n, d)
    return k, v, kv_s


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                    actual_seq_lengths: Optional[Sequence[int]] = None,
                                    actual_seq_lengths_kv: Optional[Sequence[int]] = None,
                                    dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
                                    quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, block_table=None, query_padding_size=None,
                                    kv_padding_size=None, key_antiquant_scale=None, key_antiquant_offset=None,
                                    value_antiquant_scale=None, value_antiquant_offset=None,
                                    key_shared_prefix=None, value_shared_prefix=None,
                                    actual_shared_prefix_len=None, query_rope=None, key_rope=None,
                                    key_rope_antiquant_scale=None, num_heads: int = 1, scale: float = 1.0,
                                    pre_tokens: int = INT_MAX, next_tokens: int = INT_MAX,
                                    input_layout: str = "BSH", num_key_value_heads: int = 0,
                                    sparse_mode: int = 0, inner_precise: int = 0, block_size: int = 0,
                                    antiquant_mode: int = 0, softmax_lse_flag: bool = False,
                                    key_antiquant_mode: int = 0, value_antiquant_mode: int = 0):
    """torch_npu.npu_fused_infer_attention_score(query, key, value, *, ...) -> (out, softmax_lse)

    Doc: op-plugin docs/context/torch_npu-npu_fused_infer_attention_score.md:
    - "参数说明": query/key/value float16 or bfloat16 (same dtype here: the int8 / int4 KV paths
      are not emulated), non-contiguous tensors NOT supported; input_layout BSH / BSND / BNSD;
      num_heads must equal query's N for BNSD; num_key_value_heads 0 = same as num_heads,
      otherwise num_heads % num_key_value_heads == 0 with ratio <= 64 and equal to key's N (GQA);
      scale multiplies QK^T (default 1.0: it must be set explicitly); atten_mask bool / int8 /
      uint8, shapes (Q_S, KV_S), (B, Q_S, KV_S), (1, Q_S, KV_S), (B, 1, Q_S, KV_S),
      (1, 1, Q_S, KV_S) when Q_S > 1 and (B, KV_S), (B, 1, KV_S), (B, 1, 1, KV_S) when Q_S == 1,
      optionally padded up to an aligned S; actual_seq_lengths_kv: per-batch valid KV length
      (length 1 = the same for every batch, else >= B entries); sparse_mode 0 = the full user mask.
    - Mask polarity (the same for the whole Ascend flash-attention family, e.g. aclnnFlash
      AttentionScore "attenMaskOptional: 取值为1代表该位不参与计算（不生效），为0代表该位参与计算"):
      True / 1 = MASKED (not attended).
    - "约束说明": B <= 65536, N <= 256, D <= 512; when Q_S > 1 and the inputs are float16 /
      bfloat16, D must be 16-aligned; sparse_mode 2/3/4 need the compressed 2048x2048 mask (not
      emulated); Q_S == 1 ignores sparse_mode, pre_tokens and next_tokens.
    - "输出说明": attention_out has query's shape and dtype; softmax_lse is a [1] zero tensor
      unless softmax_lse_flag.
    - Page attention ("约束说明", "page attention场景", both the Q_S > 1 and the Q_S == 1 lists):
      enabled by a valid block_table; key/value are then the block pool "in one contiguous piece
      of memory", float16 / bfloat16, and the key/value input_layout is ignored. Cache layouts:
      (blocknum, blocksize, H = KV_N * D) for any query layout, (blocknum, KV_N, blocksize, D) only
      when the query's input_layout is BNSD (or TND); the 3-D layout needs KV_N * D <= 65535.
      block_table: int32, 2-D, first dim == B, second dim >= maxBlockNumPerSeq (the block count of
      the longest actual_seq_lengths_kv); actual_seq_lengths_kv must be given; blocknum >= the sum
      over batches of ceil(actual_seq_lengths_kv[b] / block_size). block_size: Q_S > 1 (the
      PromptFlashAttention branch): a multiple of 128 in [128, 512]; Q_S == 1 (the
      IncreFlashAttention branch): 16-aligned for float16 / bfloat16 KV. With an atten_mask
      (B, 1, Q_S, KV_S) the mask's KV_S must be >= maxBlockNumPerSeq * block_size. Sequence b's
      KV position j lives in block block_table[b, j // block_size] at offset j % block_size;
      positions >= actual_seq_lengths_kv[b] are not attended. Page attention excludes left
      padding (query_padding_size / kv_padding_size), tensor lists and KV antiquant.
    Assumptions: fully-masked query rows come out as zeros when inner_precise has bit 1 set (row
    invalid correction) and as NaN otherwise (the doc only warns of "precision loss"); softmax in
    fp32. The doc says block ids are NOT validated ("当前不会对blockid的合法性进行校验"): a block id
    that a sequence reads and that lies outside [0, blocknum) is undefined on hardware and an
    error here; table entries past a sequence's blocks are never read.
    """
    op = "npu_fused_infer_attention_score"
    for name, val in (("pse_shift", pse_shift), ("dequant_scale1", dequant_scale1), ("quant_scale1", quant_scale1),
                      ("dequant_scale2", dequant_scale2), ("quant_scale2", quant_scale2),
                      ("quant_offset2", quant_offset2), ("antiquant_scale", antiquant_scale),
                      ("antiquant_offset", antiquant_offset),
                      ("query_padding_size", query_padding_size), ("kv_padding_size", kv_padding_size),
                      ("key_antiquant_scale", key_antiquant_scale), ("value_antiquant_scale", value_antiquant_scale),
                      ("key_shared_prefix", key_shared_prefix), ("query_rope", query_rope)):
        if val is not None:
            _unsupported(op, name)
    if softmax_lse_flag:
        _unsupported(op, "softmax_lse_flag=True")
    if input_layout not in _LAYOUTS:
        _unsupported(op, f"input_layout={input_layout!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in (torch.float16, torch.bfloat16):
            _fail(op, f"{name} must be float16 or bfloat16, got {_dt(t)}")
        if not t.is_contiguous():
            _fail(op, f"{name} must be contiguous (non-contiguous tensors are not supported)")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        _fail(op, f"query/key/value dtypes differ: {_dt(query)}, {_dt(key)}, {_dt(value)}")
    if tuple(key.shape) != tuple(value.shape):
        _fail(op, f"key and value shapes must be identical, got {tuple(key.shape)} and {tuple(value.shape)}")
    hkv = num_key_value_heads or num_heads
    if num_heads % hkv or num_heads // hkv > 64:
        _fail(op, f"num_heads ({num_heads}) must be a multiple of num_key_value_heads ({hkv}), ratio <= 64")
    # -> BNSD views
    if input_layout == "BNSD":
        if query.dim() != 4 or (block_table is None and key.dim() != 4):
            _fail(op, "BNSD needs 4-D query/key/value")
        q = query
    elif input_layout == "BSND":
        if query.dim() != 4 or (block_table is None and key.dim() != 4):
            _fail(op, "BSND needs 4-D query/key/value")
        q = query.transpose(1, 2)
    else:  # BSH
        if query.dim() != 3 or (block_table is None and key.dim() != 3):
            _fail(op, "BSH needs 3-D query/key/value")
        if query.shape[-1] % num_heads:
            _fail(op, "BSH: H must be a multiple of the head count")
        q = query.view(query.shape[0], query.shape[1], num_heads, -1).transpose(1, 2)
    if block_table is not None:      # page attention: gather each sequence's blocks (BNSD)
        k, v, page_kv_s = _paged_kv(op, q, key, value, block_table, block_size, actual_seq_lengths_kv,
                                    input_layout, hkv, atten_mask)
    elif input_layout == "BNSD":
        k, v = key, value
    elif input_layout == "BSND":
        k, v = key.transpose(1, 2), value.transpose(1, 2)
    else:
        if key.shape[-1] % hkv:
            _fail(op, "BSH: H must be a multiple of the head count")
        k = key.view(key.shape[0], key.shape[1], hkv, -1).transpose(1, 2)
        v = value.view(value.shape[0], value.shape[1], hkv, -1).transpose(1, 2)
    b, nq, sq, d = q.shape
    _, nk, skv, dk = k.shape
    if nq != num_heads:
        _fail(op, f"num_heads ({num_heads}) must equal query's N ({nq})")
    if nk != hkv:
        _fail(op, f"num_key_value_heads ({num_key_value_heads}) must equal key's N ({nk})")
    if dk != d or k.shape[0] != b:
        _fail(op, f"query {tuple(q.shape)} and key {tuple(k.shape)} disagree on B or D")
    if b > 65536 or nq > 256 or d > 512:
        _fail(op, f"B <= 65536, N <= 256, D <= 512 required, got B={b}, N={nq}, D={d}")
    if sq > 1 and d % 16:
        _fail(op, f"with Q_S > 1 and float16/bfloat16 inputs D must be 16-aligned, got D={d}")
    if sq > 1:
        if sparse_mode in (2, 3, 4):
            _unsupported(op, f"sparse_mode={sparse_mode} (compressed 2048x2048 masks)")
        if sparse_mode not in (0, 1):
            _fail(op, f"sparse_mode must be one of 0-4, got {sparse_mode}")
        if (pre_tokens, next_tokens) != (INT_MAX, INT_MAX) and atten_mask is not None:
            _unsupported(op, "pre_tokens / next_tokens bands together with an atten_mask")
        if sparse_mode == 1 and atten_mask is None:
            _fail(op, "sparse_mode 1 (allMask) needs the full atten_mask")
    if not isinstance(scale, (float, int)):
        _fail(op, "scale must be a Python float")

    masked = torch.zeros(b, 1, sq, skv, dtype=torch.bool, device=q.device)
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.int8, torch.uint8):
            _fail(op, f"atten_mask must be bool, int8 or uint8, got {_dt(atten_mask)}")
        if not atten_mask.is_contiguous():
            _fail(op, "atten_mask must be contiguous")
        am = atten_mask != 0                                    # True / 1 = masked
        shp = tuple(am.shape)
        if sq > 1:
            ok = (am.dim() == 2 or (am.dim() == 3 and shp[0] in (1, b)) or
                  (am.dim() == 4 and shp[0] in (1, b) and shp[1] == 1))
        else:
            ok = (am.dim() == 2 and shp[0] == b) or (am.dim() == 3 and shp[0] == b and shp[1] == 1) or \
                 (am.dim() == 4 and shp[0] == b and shp[1] == 1 and shp[2] == 1)
        if not ok:
            _fail(op, f"atten_mask shape {shp} is not allowed for Q_S={sq} (B={b})")
        if am.dim() >= 3 or sq > 1:
            if shp[-2] < sq:
                _fail(op, f"atten_mask Q_S dim {shp[-2]} < Q_S {sq}")
        if shp[-1] < skv:
            _fail(op, f"atten_mask KV_S dim {shp[-1]} < KV_S {skv}")
        if am.dim() == 2 and sq > 1:
            am = am[None, None]
        elif am.dim() == 2:
            am = am[:, None, None]
        elif am.dim() == 3:
            am = am[:, None]
        masked = masked | am[:, :, :sq, :skv]
    if actual_seq_lengths_kv is not None:
        lens = list(actual_seq_lengths_kv)
        if len(lens) == 1:
            lens = lens * b
        elif len(lens) < b:
            _fail(op, f"actual_seq_lengths_kv needs 1 or >= B entries, got {len(lens)}")
        for i in range(b):
            if not 0 <= int(lens[i]) <= skv:
                _fail(op, f"actual_seq_lengths_kv[{i}] = {lens[i]} exceeds KV_S {skv}")
            masked[i, :, :, int(lens[i]):] = True
    qvalid = None
    if actual_seq_lengths is not None and sq > 1:
        lens = list(actual_seq_lengths)
        lens = lens * b if len(lens) == 1 else lens[:b]
        qvalid = torch.arange(sq, device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]
    rep = nq // nk
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * float(scale)
    scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    dead = masked.all(dim=-1, keepdim=True)                     # [B, 1, Q_S, 1]
    fill = 0.0 if inner_precise & 2 else float("nan")
    probs = torch.where(dead, torch.full_like(probs, fill), probs)
    out = probs @ vf                                            # [B, N, Q_S, D]
    if qvalid is not None:
        out = out * qvalid[:, None, :, None]
    out = out.to(query.dtype)
    if input_layout == "BSND":
        out = out.transpose(1, 2).contiguous()
    elif input_layout == "BSH":
        out = out.transpose(1, 2).reshape(b, sq, nq * d)
    return out, torch.zeros(1, dtype=torch.float32, device=q.device)


# ------------------------------------------------------------------------------ scatter update

_SCATTER_ND_DTYPES = (torch.float32, torch.float16, torch.bool, torch.bfloat16, torch.int64, torch.int8)


def npu_scatter_nd_update_(input: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_scatter_nd_update_(input, indices, updates) -> Tensor (input, updated in place)

    Doc: op-plugin docs/context/torch_npu-npu_scatter_nd_update_.md: input[indices[i]] = updates[i]
    in place; input 1-8 dims, ND, non-contiguous allowed, dtype float32 / float16 / bool / bfloat16
    / int64 / int8 on Atlas A2/A3, updates of input's dtype; indices int32 / int64, at least 2-D,
    its last dim a <= input.dim(); updates.shape == indices.shape[:-1] + input.shape[a:]; indices
    "不支持越界" (must be in range).
    Assumptions: an out-of-range (or negative) index is an error here (undefined on hardware); when
    indices repeat, which update lands is unspecified (here: torch's index_put order).
    """
    op = "npu_scatter_nd_update_"
    if input.dtype not in _SCATTER_ND_DTYPES:
        _fail(op, f"input dtype {_dt(input)} is not supported (float32, float16, bool, bfloat16, int64, int8)")
    if updates.dtype != input.dtype:
        _fail(op, f"updates dtype ({_dt(updates)}) must equal input dtype ({_dt(input)})")
    if not 1 <= input.dim() <= 8:
        _fail(op, f"input must have 1-8 dims, got {input.dim()}")
    if indices.dtype not in (torch.int32, torch.int64):
        _fail(op, f"indices must be int32 or int64, got {_dt(indices)}")
    if indices.dim() < 2:
        _fail(op, f"indices must be at least 2-D, got shape {tuple(indices.shape)}")
    a = indices.shape[-1]
    if not 1 <= a <= input.dim():
        _fail(op, f"indices' last dim ({a}) must be in [1, input.dim()={input.dim()}]")
    want = tuple(indices.shape[:-1]) + tuple(input.shape[a:])
    if tuple(updates.shape) != want:
        _fail(op, f"updates shape {tuple(updates.shape)} must be indices.shape[:-1] + input.shape[{a}:] = {want}")
    idx = indices.reshape(-1, a).to(torch.int64)
    if idx.numel():
        bound = torch.tensor(input.shape[:a], dtype=torch.int64, device=idx.device)
        if bool((idx < 0).any()) or bool((idx >= bound).any()):
            _fail(op, f"indices out of range for input shape {tuple(input.shape)} (not supported)")
    input[tuple(idx.t())] = updates.reshape(-1, *input.shape[a:])
    return input


# ------------------------------------------------------------------------- norms, rope, swiglu

def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (Tensor, Tensor)

    Doc: op-plugin docs/context/（beta）torch_npu-npu_rms_norm.md: RmsNorm(x) = x / Rms(x) * g,
    Rms(x) = sqrt(mean(x^2) + eps); self float16 / bfloat16 / float32 with 2-8 dims; gamma of the
    SAME dtype, usually self's last dim; returns (RmsNorm(x), 1 / Rms(x)).
    Assumptions: computed in fp32 and rounded once to self's dtype; rstd is float32 with the
    normalised dims kept as size 1.
    """
    op = "npu_rms_norm"
    if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(op, f"self must be float16, bfloat16 or float32, got {_dt(self)}")
    if gamma.dtype != self.dtype:
        _fail(op, f"gamma dtype ({_dt(gamma)}) must equal self dtype ({_dt(self)})")
    if not 2 <= self.dim() <= 8:
        _fail(op, f"self must have 2-8 dims, got {self.dim()}")
    nd = gamma.dim()
    if tuple(self.shape[-nd:]) != tuple(gamma.shape):
        _fail(op, f"gamma shape {tuple(gamma.shape)} must match the trailing dims of self {tuple(self.shape)}")
    dims = tuple(range(-nd, 0))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = xf * rstd * gamma.float()
    return y.to(self.dtype), rstd


def _rope_layout_ok(x_shape, r_shape) -> bool:
    """Whether r broadcasts onto x under one of the documented layouts, with B, N < 1000."""
    a, b, c, d = x_shape
    r = tuple(r_shape)
    readings = (  # (B, N, allowed r shapes) for x read as BNSD, BSND, SBND
        (a, b, {(1, 1, c, d), (a, 1, c, d), (a, b, c, d)}),
        (a, c, {(1, b, 1, d), (a, b, 1, d), (a, b, c, d)}),
        (b, c, {(a, 1, 1, d), (a, b, 1, d), (a, b, c, d)}),
    )
    return any(r in ok and bb < 1000 and nn < 1000 for bb, nn, ok in readings)


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"):
    """torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode='half') -> Tensor

    Doc: op-plugin docs/context/torch_npu-npu_rotary_mul.md: half mode: x1, x2 = chunk(input, 2, -1);
    out = r1 * input + r2 * cat(-x2, x1) (rotate-half, transformers' convention); interleave mode
    pairs even/odd elements; input, r1, r2 4-D float16 / bfloat16 / float32; "约束说明": input layout
    BNSD / BSND / SBND with D < 896 and even, B, N < 1000; r1/r2 broadcast as 11SD / B1SD / BNSD
    (x BNSD), 1S1D / BS1D / BSND (x BSND), S11D / SB1D / SBND (x SBND); output has input's shape
    and dtype.
    Assumptions: r1 / r2 must have input's dtype; computed in fp32, rounded once.
    """
    op = "npu_rotary_mul"
    for name, t in (("input", input), ("r1", r1), ("r2", r2)):
        if t.dim() != 4:
            _fail(op, f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            _fail(op, f"{name} must be float16, bfloat16 or float32, got {_dt(t)}")
    if r1.dtype != input.dtype or r2.dtype != input.dtype:
        _fail(op, f"r1/r2 dtype ({_dt(r1)}, {_dt(r2)}) must equal input dtype ({_dt(input)})")
    d = input.shape[-1]
    if d >= 896 or d % 2:
        _fail(op, f"D must be even and < 896, got {d}")
    if tuple(r1.shape) != tuple(r2.shape) or not _rope_layout_ok(input.shape, r1.shape):
        _fail(op, f"r1/r2 shape {tuple(r1.shape)} is not a supported broadcast of input {tuple(input.shape)} "
                  "(11SD/B1SD/BNSD, 1S1D/BS1D/BSND, S11D/SB1D/SBND with B, N < 1000)")
    xf, c, s = input.float(), r1.float(), r2.float()
    if rotary_mode == "half":
        x1, x2 = torch.chunk(xf, 2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    elif rotary_mode == "interleave":
        rot = torch.stack((-xf[..., 1::2], xf[..., ::2]), dim=-1).flatten(-2)
    else:
        _fail(op, f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    return (c * xf + s * rot).to(input.dtype)


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch_npu.npu_swiglu(input, dim=-1) -> Tensor

    Doc: op-plugin docs/context/（beta）torch_npu-npu_swiglu.md: A, B = the first and second halves
    of input along dim; out = swish(A) * B = A * sigmoid(A) * B (so the GATE is the first half);
    input 1-8 dims, fp32 / fp16 / bf16, contiguous, dim size even.
    Assumption: computed in fp32, rounded once to input's dtype.
    """
    op = "npu_swiglu"
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(op, f"input must be float32, float16 or bfloat16, got {_dt(input)}")
    if not input.is_contiguous():
        _fail(op, "input must be contiguous")
    if input.shape[dim] % 2:
        _fail(op, f"input dim {dim} size ({input.shape[dim]}) must be even")
    a, b = torch.chunk(input.float(), 2, dim=dim)
    return (F.silu(a) * b).to(input.dtype)
