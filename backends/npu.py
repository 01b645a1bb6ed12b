"""Ascend NPU backend: the op contract on torch_npu (Ascend Extension for PyTorch).

``torch_npu`` is imported here only, inside ``make_backend`` (installing it next to a CPU or CUDA
torch breaks ``import torch``, so nothing else in Quasar may import it). Without it,
``make_backend`` raises ``UnsupportedError`` naming the torch / torch-npu / CANN versions to
install, which ``python -m quasar.run --device npu`` prints before exiting with status 2.

Kernels (argument conventions from the torch_npu API reference, Ascend/op-plugin
``docs/context/torch_npu-<op>.md``; the emulation in ``tests/npu_emulation`` cites each section):

| op | torch_npu | notes |
|---|---|---|
| rms_norm | ``npu_rms_norm(x, gamma, eps)[0]`` | returns (y, rstd) |
| add_rms_norm | composed: x + delta, then rms_norm / rms_norm_quant | torch_npu's ``npu_add_rms_norm`` is not used yet |
| rope | ``npu_rotary_mul(x, cos, sin)`` | x BSND [B, T, H, D], cos/sin BS1D, rotate-half |
| silu_mul | ``npu_swiglu(x, dim=-1)`` | swish(first half) * second half: gate first |
| quantize_per_token int8 | ``npu_dynamic_quant(x)`` | (int8, fp32 per-row scale) |
| gemm_w8a8_int8 | ``npu_quant_matmul(xq, w[K, N], scale_fp32[N], pertoken_scale=xs[M], bias, output_dtype=x.dtype)`` | bias bf16 (bf16 out) / fp32 (fp16 out) |
| gemm_w8a16 | ``npu_weight_quant_batchmatmul(x, w_int8[K, N], scale[N])`` | scale in x's dtype |
| gemm_w4a16 | ``npu_weight_quant_batchmatmul(x, int4pack[K, N/8], scale[G, N], -zero[G, N], antiquant_group_size=g)`` | (w + offset) * scale |
| attention | ``npu_fused_infer_attention_score(q, k, v, input_layout="BNSD", atten_mask=bool, ...)`` | True = masked |
| kv_write | plain torch index_put on the static BNSD cache | |
| rope_kv_write | composed: rms_norm (q/k norms), rope, kv_write above | torch_npu's fused ``npu_kv_rmsnorm_rope_cache`` is not used yet |
| paged_kv_write | ``npu_scatter_nd_update_(cache.k[layer], idx[N, Hkv, 3], k)`` (same for v) | in place on our [blocks, Hkv, bs, D] layer, idx = (slot // bs, head, slot % bs) |
| paged_rope_kv_write | composed: rms_norm, rope (the step as B = 1), paged_kv_write above | |
| hier_rope_kv_write, hier_attention | not supported: UnsupportedError naming the alternative (kv_cache.representation: dense) | the KV antiquant modes are per channel over the sequence or per token, and not paged (see `kv_unsupported`) |
| paged_attention | ``npu_fused_infer_attention_score(q_BNSD, cache.k[layer], cache.v[layer], block_table=int32, block_size=bs, actual_seq_lengths_kv, atten_mask, input_layout="BNSD")`` | page attention on the cache layer itself (no copy); one call per distinct chunk length; tree steps (ctx.tree_mask) always pass an explicit bool mask built from storage indices and ancestor bits |

Paged KV cache (docs/context/torch_npu-npu_fused_infer_attention_score.md, "page attention场景"):
the cache layer [num_blocks, Hkv, block_size, D] IS the documented (blocknum, KV_N, blocksize, D)
page-attention layout, which the kernel takes with a BNSD query, so it is passed as it is (a view,
no copy). block_table must be int32 [B, >= maxBlockNumPerSeq] (ctx.block_tables converted once per
step); actual_seq_lengths_kv (required) is each sequence's last position + 1. block_size: a Q_S > 1
call (verify / prefill) needs a multiple of 128 in [128, 512], a Q_S == 1 call (decode) a multiple of
16; use block_size 128 on npu (vLLM-Ascend's only kernel block size). A step whose block size (or an
unaligned head_dim with Q_S > 1, or a cache dtype unlike q's) the kernel refuses gathers its
sequences' blocks into a contiguous BNSD copy and runs the dense kernel instead (logged once).
Query rows are causal within a chunk through a [B, 1, T, W * bs] bool mask (True = masked: slot j
is hidden from a row at position p when j > p), left out when actual_seq_lengths_kv alone says it
(decode). A tree step (ctx.tree_mask, quasar.spec_decode.tree) reads storage indices
(ctx.attn_positions: actual_seq_lengths_kv = the largest + 1) and always passes the mask, built
from the tree rule of the reference (ops/reference.py ``visible``): slot j is visible to a row at
storage index p of sequence b iff j <= p and (j < s_b, the context, or bit j - s_b of the row's
ancestor mask). The KV write uses ``npu_scatter_nd_update_`` (documented, float32 included):
``npu_scatter_pa_kv_cache`` documents only the (blocks, block_size, heads, D) and NZ layouts, not ours.
A ragged step (ctx.chunk == 0: varlen prefill) makes one call per distinct chunk length (sequences of
equal length batched together); the TND layout is not used (the docs exclude page attention from
TND unless D = 512 with rope inputs).

Weights are prepared once (``prepare_weight``): int8 codes transposed to [K, N]; int4 codes
transposed to [K, N] int32 and packed with ``npu_convert_weight_to_int4pack`` (8 nibbles per
int32, element e of a word at bits [4e, 4e+4)); per-channel scales as fp32 [N] (cast once per
activation dtype where the kernel wants it), per-group scales as [ceil(K/g), N]; an asymmetric
zero point z becomes ``antiquant_offset = -z`` (the kernel computes (w + offset) * scale).
Out-features above the kernels' 65535 limit are tiled along N (exact: columns are independent);
in-features above it are refused (no dense LLM has them). ``antiquant_group_size`` must be a
multiple of 32 in [32, K-1]: a group size that is not is run per channel when that is exact (every
group of a row has the same scale and zero point, logged), and refused otherwise.

float32 is the validation dtype (tests compare it to transformers at 1e-4). The fused attention,
dynamic-quant and quantized-GEMM kernels take float16/bfloat16 only, so in float32 those ops run
as composed torch ops on the device from the same prepared weights and the same mask (logged once
per op); rms_norm, rope and silu_mul keep their kernels. Speed runs use bfloat16 (``dtype: auto``).

The GEMM rows above are the kernels the schemes list for "npu" (quasar/quant/): they call
``quant_matmul`` / ``weight_quant_matmul`` and ``prepare_int8`` / ``prepare_int4`` here. Schemes
without an npu kernel (w8a8-fp8: FP8 matmul exists only on Ascend 950; w4a4) say why in their
module (``Scheme.unsupported``), and ``check_scheme`` repeats it. Nothing here has run on Ascend hardware: it is verified against the emulation of the
documented semantics only (docs/ascend.md).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .base import Backend
from quasar.errors import UnsupportedError
from quasar.ops import reference as ref
from quasar.ops.types import QActivation, QuantizedWeight

log = logging.getLogger("quasar")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)   # what the fused kernels accept for activations
LAST_DIM_LIMIT = 65535     # npu_quant_matmul: last dims of x1, x2 <= 65535; WQBMM: K, N in [1, 65535]
N_TILE = 65472             # largest multiple of 64 <= 65535: the N-tile when out-features exceed it
PA_PROMPT_BLOCK = (128, 512, 128)   # FIA page attention, Q_S > 1: block_size in [128, 512], multiple of 128
PA_DECODE_ALIGN = 16                # FIA page attention, Q_S == 1, float16/bfloat16 KV: block_size 16-aligned
PAGED_BLOCK_SIZE = 128              # the block size to give the paged cache on npu (both branches take it)

INSTALL_HINT = (
    "install Ascend's PyTorch adapter (torch-npu) matched exactly to torch and CANN, on an Ascend host:\n"
    "  CANN 9.1.x:   torch==2.12.0, torch-npu==2.12.0.post2 (recommended)\n"
    "  CANN 8.5.0:   torch==2.9.0,  torch-npu==2.9.0\n"
    "  CANN 8.3.RC1: torch==2.7.1,  torch-npu==2.7.1 (the vLLM-Ascend 0.11 stack)\n"
    "Source CANN's set_env.sh before starting Python. Never install torch-npu into an environment whose\n"
    "CPU or CUDA torch you still need (it breaks `import torch` there). Details: docs/ascend.md")


def _import_torch_npu():
    try:
        import torch_npu  # noqa: F401  (the only import of torch_npu in Quasar)
    except Exception as e:  # ImportError, or OSError / RuntimeError from a broken CANN setup
        why = f"{type(e).__name__}: {e}"
        raise UnsupportedError(
            f"--device npu needs torch_npu, which could not be imported ({why.splitlines()[0][:200]}); "
            "without an Ascend NPU use --device cpu or cuda.\n"
            f"This environment has torch {torch.__version__}. To run on an Ascend NPU, {INSTALL_HINT}") from None
    return torch_npu


# ------------------------------------------------------------------------------ prepared weights

@dataclass
class _Part:
    """Columns [n0, n1) of a prepared weight, in the kernel's layout."""
    n0: int
    n1: int
    w: torch.Tensor                     # int8 [K, n] or int32 [K, n/8] (npu_convert_weight_to_int4pack)
    scale: torch.Tensor                 # fp32 [n] (per channel) or [G, n] (per group)
    offset: Optional[torch.Tensor]      # fp32 like scale: -zero_point (asymmetric int4), or None
    _cast: dict = field(default_factory=dict)

    def antiquant(self, dtype: torch.dtype):
        """(antiquant_scale, antiquant_offset) in the activation dtype (WQBMM wants them equal)."""
        if dtype not in self._cast:
            self._cast[dtype] = (self.scale.to(dtype),
                                 None if self.offset is None else self.offset.to(dtype))
        return self._cast[dtype]

    def bias(self, bias: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """This part's slice of `bias` in `dtype`, converted once per bias tensor."""
        if bias is None:
            return None
        key = ("bias", id(bias), dtype)
        hit = self._cast.get(key)
        if hit is not None and hit[0]() is bias:
            return hit[1]
        b = bias[self.n0:self.n1].to(dtype).contiguous()
        self._cast[key] = (weakref.ref(bias), b)
        return b


@dataclass
class NpuWeight:
    """A linear's weight prepared for the NPU kernels (see the module docstring)."""
    scheme: str
    n: int
    k: int
    bits: int
    group_size: int                     # antiquant_group_size: 0 = per channel
    hadamard: bool
    parts: list

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)


def _tiles(n: int, align: int = 1) -> list[tuple[int, int]]:
    if n <= LAST_DIM_LIMIT:
        return [(0, n)]
    step = N_TILE - N_TILE % align
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:      # inference tensors do not track a version counter
        return None


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of npu_convert_weight_to_int4pack along the last dim -> int8 codes in [-8, 7]
    (element e of a word at bits [4e, 4e + 4), two's complement nibbles)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF
    nib = torch.where(nib >= 8, nib - 16, nib)
    return nib.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(torch.int8)


# ------------------------------------------------------------------------------------- the ops

class NpuBackend(Backend):
    name = "npu"
    dtypes = DTYPES

    def __init__(self, tnpu, device: torch.device, options=None, emulated: bool = False):
        super().__init__(device, options)
        self.t = self.tnpu = tnpu
        self.emulated = emulated
        self._said: set = set()
        self._mask_key: Optional[tuple] = None
        self._mask_val: Optional[torch.Tensor] = None
        # composed of this backend's own kernels (torch_npu's fused variants are not used yet)
        self._add_rms_norm = ref.add_rms_norm_with(self.rms_norm, self.rms_norm_quant)
        self._rope_kv_write = ref.rope_kv_write_with(self.rms_norm, self.rope, self.kv_write)
        self._paged_rope_kv_write = ref.paged_rope_kv_write_with(self.rms_norm, self.rope, self.paged_kv_write)
        self._paged_key: Optional[tuple] = None       # per-step page-attention metadata (see _paged_meta)
        self._paged_val: Optional[list] = None
        self._slot_key: Optional[tuple] = None        # per-step scatter indices (see _slot_index)
        self._slot_val: Optional[torch.Tensor] = None

    @classmethod
    def create(cls, options=None) -> "NpuBackend":
        tnpu = _import_torch_npu()
        emulated = bool(getattr(tnpu, "_quasar_emulation", False))
        if emulated:
            device = torch.device("cpu")          # the test emulation computes on the CPU
        else:
            try:
                ok = bool(tnpu.npu.is_available())
            except Exception:
                ok = False
            if not ok:
                raise UnsupportedError(
                    "torch_npu imported but sees no Ascend NPU: check the driver (npu-smi info), that CANN's "
                    "set_env.sh was sourced, and ASCEND_RT_VISIBLE_DEVICES; without an NPU use --device cpu")
            device = torch.device("npu")
        return cls(tnpu, device, options, emulated)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def add_rms_norm(self, x, delta, weight, eps, qtype=None):
        return self._add_rms_norm(x, delta, weight, eps, qtype)

    def rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer):
        return self._rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer)

    def paged_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        return self._paged_rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer)

    # QuantSpec's hierarchical KV cache: npu_fused_infer_attention_score's KV antiquant takes
    # per-channel scales for the whole sequence ((N, D)) or per-token scales ((B, S), float32),
    # and not with page attention ("page attention不支持伪量化场景"); the cache's keys are grouped per
    # channel over each block of G tokens, paged. No documented mapping: refuse, naming the way out.
    kv_unsupported = {"hierarchical-int4": (
        "its keys are quantized per channel over each block of G tokens, and torch_npu's "
        "npu_fused_infer_attention_score documents KV antiquant only per channel over the whole "
        "sequence or per token, and not with page attention; use kv_cache.representation: dense "
        "on npu (drafting with drafter.method quantized_self still works), or run QuantSpec with "
        "--device cuda or cpu")}

    def hier_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        self.check_kv(cache.representation)

    def hier_attention(self, q, cache, layer, ctx, upper_only):
        self.check_kv(cache.representation)

    def _once(self, key: str, msg: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning("npu: %s", msg)

    def _fp32_note(self, op: str) -> None:
        self._once("fp32-" + op, f"{op} in float32 runs as composed torch ops (the fused kernel takes "
                                 "float16/bfloat16 only): a validation mode, not the fast path; use "
                                 "dtype bfloat16 for speed")

    def synchronize(self) -> None:
        self.t.npu.synchronize()

    def free_memory(self) -> int:
        info = getattr(self.t.npu, "mem_get_info", None)
        return info()[0] if info is not None and not self.emulated else super().free_memory()

    # -------------------------------------------------------------- norms, rope, activations
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.contiguous() if x.dim() >= 2 else x.reshape(1, -1)
        y, _ = self.t.npu_rms_norm(x2, weight.to(x.dtype), eps)
        return y.view(shape)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [B, T, H, D] is BSND; cos/sin [B, T, D] -> BS1D
        return self.t.npu_rotary_mul(x.contiguous(), cos.unsqueeze(2).to(x.dtype).contiguous(),
                                     sin.unsqueeze(2).to(x.dtype).contiguous())

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self.t.npu_swiglu(x.contiguous(), dim=-1)

    def quantize_per_token(self, x: torch.Tensor, qtype: str) -> QActivation:
        if qtype == "int8":
            if x.dtype in KERNEL_DTYPES:
                q, s = self.t.npu_dynamic_quant(x.contiguous())
                return QActivation(q, s.reshape(-1, 1).float(), "int8", x.dtype)
            self._fp32_note("quantize_per_token")
            return ref.quantize_per_token(x, "int8")
        if qtype == "int4":   # no int4-activation consumer on npu (w4a4 is unsupported); plain torch
            return ref.quantize_per_token(x, "int4")
        raise UnsupportedError(f"quantize_per_token to {qtype!r} is not supported by the npu backend "
                               "(no FP8 on Atlas A2/A3); use int8, or the cuda backend for fp8")

    def rms_norm_quant(self, x, weight, eps, qtype) -> QActivation:
        return self.quantize_per_token(self.rms_norm(x, weight, eps), qtype)

    def silu_mul_quant(self, x, qtype) -> QActivation:
        return self.quantize_per_token(self.silu_mul(x), qtype)

    # ----------------------------------------------------------------------- weight preparation
    def check_k(self, k: int) -> tuple[bool, str]:
        if k > LAST_DIM_LIMIT:
            return False, (f"in-features K={k} exceeds the 65535 limit of npu_quant_matmul / "
                           "npu_weight_quant_batchmatmul (torch_npu docs, 约束说明); tiling K would add a "
                           "rounding step per tile, so it is refused; use the cpu or cuda backend for this layer")
        return True, ""

    def _check_k(self, k: int, scheme: str) -> None:
        ok, why = self.check_k(k)
        if not ok:
            raise UnsupportedError(f"{scheme} on npu: {why}")

    def prepare_int8(self, qw: QuantizedWeight) -> NpuWeight:
        """w8a8-int8 and w8a16: int8 per-channel symmetric codes [N, K] -> [K, N], scale fp32 [N]."""
        if not isinstance(qw, QuantizedWeight) or qw.bits != 8 or qw.is_fp8 or qw.zero is not None \
                or qw.scale.shape[1] != 1:
            raise UnsupportedError("w8a8-int8 / w8a16 on npu need int8 symmetric per-channel weights, got "
                                   f"{getattr(qw, 'bits', type(qw).__name__)}-bit, group_size "
                                   f"{getattr(qw, 'group_size', '?')}")
        n, k = qw.shape
        self._check_k(k, "int8 weights")
        wkn = qw.codes.to(self.device).t()
        scale = qw.scale.to(self.device).reshape(-1).float()
        parts = [_Part(a, b, wkn[:, a:b].contiguous(), scale[a:b].contiguous(), None) for a, b in _tiles(n)]
        if len(parts) > 1:
            self._once(f"tile-{n}", f"out-features {n} > 65535: the GEMM runs in {len(parts)} N-tiles")
        return NpuWeight("int8", n, k, 8, 0, qw.hadamard, parts)

    def prepare_int4(self, qw: QuantizedWeight) -> NpuWeight:
        """int4 codes [N, K] (+ scales [N, G], zero points [N, G]) -> int4pack [K, N/8],
        antiquant_scale [G, N] (per group) or [N] (per channel), antiquant_offset = -zero."""
        if not isinstance(qw, QuantizedWeight) or qw.bits != 4:
            raise UnsupportedError("w4a16 on npu needs int4 weights")
        n, k = qw.shape
        self._check_k(k, "int4 weights")
        if n % 8:
            raise UnsupportedError(f"w4a16 on npu: out-features {n} is not a multiple of 8, which "
                                   "npu_convert_weight_to_int4pack needs (8 int4 per int32 along N)")
        g_count = qw.scale.shape[1]
        g = k if qw.group_size == -1 else qw.group_size
        scale = qw.scale.to(self.device).float()
        zero = None if qw.zero is None else qw.zero.to(self.device)
        if g_count == 1:
            gs = 0
        elif g % 32 == 0 and 32 <= g <= k - 1:
            gs = g
        else:
            uniform = bool(torch.all(scale == scale[:, :1])) and (zero is None or bool(torch.all(zero == zero[:, :1])))
            if not uniform:
                raise UnsupportedError(
                    f"w4a16 group_size {g} (in-features {k}) is unsupported on npu: "
                    "npu_weight_quant_batchmatmul's antiquant_group_size must be a multiple of 32 in "
                    "[32, K-1] (torch_npu docs), and folding these groups into one scale per channel "
                    "would change the weights. Re-quantize with verifier.group_size 32, 64 or 128 (or -1 "
                    "for per channel), or run this checkpoint on the cpu or cuda backend")
            log.warning("npu: w4a16 group_size %d is not a multiple of 32 in [32, K-1]; every group of "
                        "each row has the same scale and zero point, so it runs per channel (exact)", g)
            gs = 0
        if gs == 0:
            scale, zero = scale[:, :1], None if zero is None else zero[:, :1]
        scale_t = scale.t()                                         # [G, N]
        off_t = None if zero is None else (-zero.float()).t()       # (w + offset) * scale
        codes_kn = qw.codes.to(self.device).t().to(torch.int32)     # [K, N]
        parts = []
        for a, b in _tiles(n, align=64):
            s = scale_t[:, a:b].contiguous()
            o = None if off_t is None else off_t[:, a:b].contiguous()
            if gs == 0:
                s, o = s.reshape(-1), None if o is None else o.reshape(-1)
            packed = self.t.npu_convert_weight_to_int4pack(codes_kn[:, a:b].contiguous())
            parts.append(_Part(a, b, packed, s, o))
        if len(parts) > 1:
            self._once(f"tile-{n}", f"out-features {n} > 65535: the GEMM runs in {len(parts)} N-tiles")
        return NpuWeight("int4", n, k, 4, gs, qw.hadamard, parts)

    # ------------------------------------------------------------------------------- GEMMs
    @staticmethod
    def _cat(outs: list) -> torch.Tensor:
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def quant_matmul(self, a: QActivation, w: NpuWeight, bias=None) -> torch.Tensor:
        """npu_quant_matmul of a per-token int8 activation with prepared int8 weights [K, N]."""
        if a.dtype in KERNEL_DTYPES:
            # bias: bfloat16 with bfloat16 output (documented in every torch_npu version; the model's
            # bias is bf16 anyway), float32 with float16 output (float16 bias is not in the table)
            bias_dtype = torch.bfloat16 if a.dtype == torch.bfloat16 else torch.float32
            xs = a.scale.reshape(-1)
            return self._cat([self.t.npu_quant_matmul(a.q, p.w, p.scale, pertoken_scale=xs,
                                                      bias=p.bias(bias, bias_dtype), output_dtype=a.dtype)
                              for p in w.parts])
        self._fp32_note("gemm_w8a8_int8")
        outs = []
        for p in w.parts:
            acc = a.q.float() @ p.w.float()          # exact while K * 127^2 < 2^24, fp32 beyond
            y = acc * a.scale * p.scale.view(1, -1)
            if bias is not None:
                y = y + p.bias(bias, torch.float32)
            outs.append(y.to(a.dtype))
        return self._cat(outs)

    def weight_quant_matmul(self, x: torch.Tensor, w: NpuWeight, bias=None) -> torch.Tensor:
        """npu_weight_quant_batchmatmul of float activations with prepared int8 / int4 weights."""
        if x.dtype in KERNEL_DTYPES:
            bias_dtype = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
            outs = []
            for p in w.parts:
                s, o = p.antiquant(x.dtype)
                outs.append(self.t.npu_weight_quant_batchmatmul(
                    x, p.w, s, o, bias=p.bias(bias, bias_dtype), antiquant_group_size=w.group_size))
            return self._cat(outs)
        self._fp32_note(f"gemm_w{w.bits}a16")
        outs = []
        for p in w.parts:
            codes = (p.w if w.bits == 8 else _unpack_int4(p.w)).float()      # [K, n]
            if w.group_size:
                s = p.scale.repeat_interleave(w.group_size, dim=0)[:w.k]
                o = None if p.offset is None else p.offset.repeat_interleave(w.group_size, dim=0)[:w.k]
            else:
                s, o = p.scale.view(1, -1), None if p.offset is None else p.offset.view(1, -1)
            wdq = (codes if o is None else codes + o) * s
            y = x.float() @ wdq
            if bias is not None:
                y = y + p.bias(bias, torch.float32)
            outs.append(y.to(x.dtype))
        return self._cat(outs)

    # -------------------------------------------------------------------- KV cache, attention
    def kv_write(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        ref.kv_write(cache, layer, k, v, positions)

    def _masked(self, positions: torch.Tensor, kv_len: int, s: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The FIA mask [B, 1, T, S], True = MASKED: slot j is hidden from query (b, i) unless
        j <= positions[b, i], j < kv_len (and mask[b, i, j], when a tree mask is given).
        Built once per forward: every layer passes the same positions / mask objects, so it is
        cached on their identity (and version counter, where the tensor has one; inference-mode
        tensors do not). A caller that rewrites a static positions buffer in place under
        inference mode (graph replay) must call invalidate_mask() after each write."""
        if self._same_mask(positions, mask, kv_len, s):
            return self._mask_val
        slots = torch.arange(s, device=positions.device)
        masked = slots[None, None, :] > positions[:, :, None]                 # [B, T, S]
        masked[:, :, kv_len:] = True
        if mask is not None:
            allow = torch.zeros_like(masked)
            allow[:, :, :kv_len] = mask[:, :, :kv_len]
            masked = masked | ~allow
        out = masked.unsqueeze(1).contiguous()                                # [B, 1, T, S]
        self._mask_key = (weakref.ref(positions), _version(positions),
                          None if mask is None else weakref.ref(mask),
                          None if mask is None else _version(mask), kv_len, s)
        self._mask_val = out
        return out

    def invalidate_mask(self) -> None:
        """Forget the cached per-forward metadata (the dense mask, the paged step's block tables,
        masks and scatter indices): call after rewriting a static positions / context buffer in
        place under inference mode."""
        self._mask_key = self._mask_val = None
        self._paged_key = self._paged_val = None
        self._slot_key = self._slot_val = None

    def _same_mask(self, positions, mask, kv_len: int, s: int) -> bool:
        if self._mask_key is None:
            return False
        pref, pver, mref, mver, kl, ss = self._mask_key
        if pref() is not positions or pver != _version(positions) or (kl, ss) != (kv_len, s):
            return False
        if mask is None:
            return mref is None
        return mref is not None and mref() is mask and mver == _version(mask)

    def attention(self, q: torch.Tensor, cache, layer: int, positions: torch.Tensor, kv_len: int,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [B, T, H, D]; the cache layer is BNSD [B, Hkv, S, D] (contiguous, passed whole, with
        actual_seq_lengths_kv = kv_len); returns [B, T, H, D]."""
        b, t, h, d = q.shape
        k, v = cache.k[layer], cache.v[layer]
        hkv, s = k.shape[1], k.shape[2]
        masked = self._masked(positions, kv_len, s, mask)
        qn = q.transpose(1, 2).contiguous()                                    # BNSD
        scale = float(d) ** -0.5
        if q.dtype not in KERNEL_DTYPES:
            self._fp32_note("attention")
            out = F.scaled_dot_product_attention(
                qn, k[:, :, :kv_len].to(q.dtype), v[:, :, :kv_len].to(q.dtype),
                attn_mask=~masked[..., :kv_len], scale=scale, enable_gqa=h != hkv)
            return out.transpose(1, 2)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if d % 16:   # FIA needs a 16-aligned D when Q_S > 1; zero-padding q, k, v is exact
            self._once("pad-d", f"head_dim {d} is not 16-aligned: q/k/v are zero-padded to a multiple "
                                "of 16 for npu_fused_infer_attention_score (exact, but copies the cache)")
            pad = 16 - d % 16
            qn, k, v = (F.pad(x, (0, pad)).contiguous() for x in (qn, k, v))
        out, _ = self.t.npu_fused_infer_attention_score(
            qn, k, v, atten_mask=masked, actual_seq_lengths_kv=[int(kv_len)] * b,
            num_heads=h, num_key_value_heads=hkv, input_layout="BNSD", scale=scale,
            sparse_mode=0, inner_precise=2 if t > 1 else 0)
        return out[..., :d].transpose(1, 2)

    # -------------------------------------------------------------------- the paged KV cache
    def _slot_index(self, slot_mapping: torch.Tensor, bs: int, hkv: int) -> torch.Tensor:
        """npu_scatter_nd_update_ indices [N, Hkv, 3] = (slot // bs, head, slot % bs) into a cache
        layer [blocks, Hkv, bs, D]; built once per step (every layer passes the same slot_mapping)."""
        key = (weakref.ref(slot_mapping), _version(slot_mapping), bs, hkv)
        if self._slot_key is not None and self._slot_key[0]() is slot_mapping and self._slot_key[1:] == key[1:]:
            return self._slot_val
        slots = slot_mapping.reshape(-1).to(torch.int64)
        n = slots.numel()
        heads = torch.arange(hkv, dtype=torch.int64, device=slots.device)
        idx = torch.stack([(slots // bs)[:, None].expand(n, hkv), heads[None, :].expand(n, hkv),
                           (slots % bs)[:, None].expand(n, hkv)], dim=-1).contiguous()
        self._slot_key, self._slot_val = key, idx
        return idx

    def paged_kv_write(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v [N, Hkv, D] -> cache slots slot_mapping[N]: npu_scatter_nd_update_ in place on the
        layer [blocks, Hkv, bs, D] (updates [N, Hkv, D] = indices.shape[:-1] + layer.shape[3:])."""
        if k.shape[0] == 0:
            return
        idx = self._slot_index(slot_mapping, cache.block_size, k.shape[1])
        self.t.npu_scatter_nd_update_(cache.k[layer], idx, k.to(cache.dtype))
        self.t.npu_scatter_nd_update_(cache.v[layer], idx, v.to(cache.dtype))

    def _paged_meta(self, ctx, bs: int) -> list:
        """The step's page-attention calls, one per distinct chunk length: built once per step
        (cached on the identity and version of ctx and its tensors, the tree fields included,
        like the dense mask)."""
        tensors = (ctx.positions, ctx.block_tables, ctx.tree_positions, ctx.tree_mask)
        refs = (weakref.ref(ctx),) + tuple(None if x is None else weakref.ref(x) for x in tensors)
        plain = (tuple(None if x is None else _version(x) for x in tensors), tuple(ctx.query_start), bs)
        pk = self._paged_key
        if pk is not None and pk[1] == plain and all(
                (r is None) == (o is None) and (r is None or r() is o)
                for r, o in zip(pk[0], (ctx,) + tensors)):
            return self._paged_val
        qs = list(ctx.query_start)
        nseq = len(qs) - 1
        tree = ctx.tree_mask is not None
        apos = ctx.attn_positions.reshape(-1)                 # storage indices (trees) or positions
        pos = apos.tolist()                                    # one host sync per step, not per layer
        dev = apos.device
        starts = ref.tree_starts(ctx) if tree else None       # each token's s_b (its tree's root)
        by_t: dict[int, list[int]] = {}
        for b in range(nseq):
            if qs[b + 1] > qs[b]:
                by_t.setdefault(qs[b + 1] - qs[b], []).append(b)
        width = ctx.block_tables.shape[1]
        groups = []
        for t, seqs in by_t.items():
            every = len(seqs) == nseq                          # the whole step, rows in order
            rows = None if every else torch.tensor([r for b in seqs for r in range(qs[b], qs[b + 1])],
                                                   dtype=torch.int64, device=dev)
            table = ctx.block_tables if every else ctx.block_tables.index_select(
                0, torch.tensor(seqs, dtype=torch.int64, device=dev))
            # actual_seq_lengths_kv: each sequence's last (storage) position + 1 (= ctx.context_lens
            # for a well-formed step; the reference attends row i to positions <= its own only)
            lens = [max(pos[qs[b]:qs[b + 1]]) + 1 for b in seqs]
            causal = tree or any(p + 1 < n for b, n in zip(seqs, lens) for p in pos[qs[b]:qs[b + 1]])
            masked = None
            if causal:                                         # [Bg, 1, T, W * bs], True = masked
                p = (apos if rows is None else apos.index_select(0, rows)).view(len(seqs), t)
                slots = torch.arange(width * bs, device=dev)[None, None, :]
                if tree:                                       # the reference's tree rule
                    masked = ~ref.visible(slots, p[:, :, None], ctx, rows, starts, (len(seqs), t, 1))
                else:
                    masked = slots > p[:, :, None]
                masked = masked.unsqueeze(1).contiguous()
            groups.append(_PagedCall(t, len(seqs), rows, table.to(torch.int64), table.to(torch.int32).contiguous(),
                                     lens, masked))
        self._paged_key, self._paged_val = (refs, plain), groups
        return groups

    @staticmethod
    def _page_kernel_refuses(t: int, bs: int, d: int) -> Optional[str]:
        """Why npu_fused_infer_attention_score's page attention cannot take this call (docs
        "约束说明", page attention场景), or None."""
        if t == 1:
            if bs % PA_DECODE_ALIGN:
                return f"block_size {bs} is not a multiple of {PA_DECODE_ALIGN} (page attention, Q_S == 1)"
            return None
        if bs % PA_PROMPT_BLOCK[2] or not PA_PROMPT_BLOCK[0] <= bs <= PA_PROMPT_BLOCK[1]:
            return (f"block_size {bs} is not a multiple of {PA_PROMPT_BLOCK[2]} in [{PA_PROMPT_BLOCK[0]}, "
                    f"{PA_PROMPT_BLOCK[1]}] (page attention, Q_S > 1)")
        if d % 16:
            return f"head_dim {d} is not 16-aligned (Q_S > 1)"
        return None

    def paged_attention(self, q: torch.Tensor, cache, layer: int, ctx) -> torch.Tensor:
        """q [N, H, D] (the step's tokens, flattened) -> o [N, H, D]; see the module docstring."""
        n, h, d = q.shape
        if n == 0:
            return torch.empty_like(q)
        if q.dtype not in KERNEL_DTYPES:
            self._fp32_note("paged_attention")
            return ref.paged_attention(q, cache, layer, ctx)
        kc, vc = cache.k[layer], cache.v[layer]               # [blocks, Hkv, bs, D]
        hkv, bs = kc.shape[1], cache.block_size
        scale = float(d) ** -0.5
        out = None
        for g in self._paged_meta(ctx, bs):
            qg = q if g.rows is None else q.index_select(0, g.rows)
            qn = qg.view(g.b, g.t, h, d).transpose(1, 2).contiguous()       # BNSD
            why = self._page_kernel_refuses(g.t, bs, d)
            if why is None and kc.dtype != q.dtype:
                why = f"the cache dtype {kc.dtype} differs from q's {q.dtype}"
            if why is None:
                o, _ = self.t.npu_fused_infer_attention_score(
                    qn, kc, vc, atten_mask=g.masked, block_table=g.table32, block_size=bs,
                    actual_seq_lengths_kv=g.lens, num_heads=h, num_key_value_heads=hkv,
                    input_layout="BNSD", scale=scale, sparse_mode=0,
                    inner_precise=2 if g.t > 1 else 0)
            else:
                o = self._paged_gathered(qn, kc, vc, g, bs, h, hkv, d, scale, why)
            o = o.transpose(1, 2).reshape(g.b * g.t, h, d)
            if g.rows is None:
                return o
            if out is None:
                out = torch.empty_like(q)
            out.index_copy_(0, g.rows, o)
        return out

    def _paged_gathered(self, qn, kc, vc, g, bs: int, h: int, hkv: int, d: int, scale: float, why: str):
        """The fallback: the group's blocks gathered into a contiguous BNSD copy
        [Bg, Hkv, nb * bs, D] (nb = the longest sequence's block count), then the dense kernel."""
        self._once("pa-gather-" + why, f"paged_attention: {why}; the sequences' blocks are copied into a "
                                       "contiguous cache for npu_fused_infer_attention_score (slower; use "
                                       "block_size 128 with a 16-aligned head_dim on npu)")
        nb = -(-max(g.lens) // bs)
        tbl = g.table64[:, :nb]
        k = kc[tbl].transpose(1, 2).reshape(g.b, hkv, nb * bs, d).to(qn.dtype)   # copy
        v = vc[tbl].transpose(1, 2).reshape(g.b, hkv, nb * bs, d).to(qn.dtype)
        masked = None if g.masked is None else g.masked[..., :nb * bs].contiguous()
        if g.t > 1 and d % 16:       # zero-padding q, k, v along D is exact
            pad = 16 - d % 16
            qn, k, v = (F.pad(x, (0, pad)).contiguous() for x in (qn, k, v))
        o, _ = self.t.npu_fused_infer_attention_score(
            qn, k, v, atten_mask=masked, actual_seq_lengths_kv=g.lens, num_heads=h,
            num_key_value_heads=hkv, input_layout="BNSD", scale=scale, sparse_mode=0,
            inner_precise=2 if g.t > 1 else 0)
        return o[..., :d]


@dataclass
class _PagedCall:
    """One page-attention kernel call of a step: the sequences whose chunks have t tokens."""
    t: int
    b: int
    rows: Optional[torch.Tensor]          # their q rows [b * t] (None: the whole step, in order)
    table64: torch.Tensor                 # [b, W] block ids
    table32: torch.Tensor                 # the same, int32 (what block_table takes)
    lens: list                            # actual_seq_lengths_kv: last (storage) position + 1 per sequence
    masked: Optional[torch.Tensor]        # [b, 1, t, W * bs] bool, True = masked; None: lens suffice
                                          # (never None for a tree step)


def make_backend(options=None) -> NpuBackend:
    return NpuBackend.create(options)


__all__ = ["NpuBackend", "make_backend", "NpuWeight", "INSTALL_HINT"]
