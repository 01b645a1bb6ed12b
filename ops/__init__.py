"""The op contract: every hardware-specific op, declared once.

Each op has a name, a signature with tensor layouts, and reference semantics. The reference
implementation (`quasar.ops.reference`, what the CPU backend runs) *is* the definition: every
other backend is tested against it. `quasar.backends.Backend` has one method per op; a device's
backend is a subclass (`quasar.backends.get(device)`). Model and scheduler code call ops only
through a backend, never a hardware API directly. The GEMM is one op for every scheme: each
quantization scheme (quasar/quant/) defines its reference arithmetic and lists its kernels per
backend. The in-memory formats (QuantizedWeight, QActivation) are in `quasar.ops.types`.

Conventions
- B batch, T tokens in the chunk (prefill: prompt length; decode: 1; verify: k+1), H query heads,
  Hkv key/value heads, D head_dim, S the static cache length, M = B*T rows, K in-features,
  N out-features.
- `positions[B, T]` (int64) are absolute positions of the chunk's tokens; query i of sequence b
  sees cache slots j <= positions[b, i] (plus an optional explicit mask for tree verification).
- Quantized activations are per-token (per row) and symmetric: x ~= q * scale, scale[M, 1] fp32.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpSpec:
    name: str
    signature: str
    semantics: str


OPS: dict[str, OpSpec] = {}


def _op(name: str, signature: str, semantics: str) -> None:
    OPS[name] = OpSpec(name, signature, semantics)


_op("rms_norm", "(x[..., K], weight[K], eps: float) -> y[..., K] (x.dtype)",
    "y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)  (transformers' RMSNorm)")
_op("rms_norm_quant", "(x[M, K], weight[K], eps, qtype) -> QActivation",
    "quantize_per_token(rms_norm(x, weight, eps), qtype): the fused norm + activation quantization")
_op("add_rms_norm", "(x[M, K], delta[M, K], weight[K], eps, qtype | None) -> (y[M, K] | QActivation, s[M, K])",
    "s = x + delta (the residual add, in x's dtype); y = rms_norm(s) or rms_norm_quant(s, qtype)")
_op("rope", "(x[B, T, H, D], cos[B, T, D], sin[B, T, D]) -> x'[B, T, H, D]",
    "rotate-half RoPE: x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x[D/2:], x[:D/2])")
_op("quantize_per_token", "(x[M, K], qtype: 'int8'|'int4'|'fp8') -> QActivation(q[M, K], scale[M, 1] f32)",
    "symmetric per-row: scale = max|x| / qmax (qmax 127, 7, 448); q = clamp(round(x / scale)); "
    "int4 codes are held one per int8 element in [-8, 7]; fp8 is float8_e4m3fn")
_op("silu_mul", "(x[M, 2I]) -> y[M, I]", "silu(x[:, :I]) * x[:, I:]  (x = concatenated gate|up)")
_op("silu_mul_quant", "(x[M, 2I], qtype) -> QActivation", "quantize_per_token(silu_mul(x), qtype)")
_op("gemm", "(x[M, K] | QActivation, w: prepared weight, bias[N] | None) -> y[M, N] (out dtype)",
    "y = x @ dequant(w).T + bias in the arithmetic of the layer's quantization scheme: the scheme's "
    "reference_gemm (quasar/quant/<scheme>.py) is the definition; each backend runs it through the "
    "kernel the scheme's list names for that backend (Scheme.choose_kernel)")
_op("kv_write", "(cache: KVCache, layer: int, k[B, T, Hkv, D], v[B, T, Hkv, D], positions[B, T]) -> None",
    "cache slots positions[b, t] of sequence b take k[b, t], v[b, t]")
_op("rope_kv_write", "(qkv[B, T, (H + 2 Hkv) D], q_norm[D] | None, k_norm[D] | None, eps, cos[S, D] f32, "
    "sin[S, D] f32, positions[B, T], cache: KVCache, layer: int) -> q[B, T, H, D]",
    "the attention prologue: q, k, v = split(qkv); q, k = rms_norm per head (when the norms are given); "
    "q, k = rope(., cos[positions], sin[positions]) (tables rounded to the rope dtype); "
    "kv_write(cache, layer, k, v, positions); returns q")
_op("attention", "(q[B, T, H, D], cache: KVCache, layer: int, positions[B, T], kv_len: int, "
    "mask[B, T, kv_len] bool | None) -> o[B, T, H, D]",
    "softmax(q k^T * D^-0.5) v over cache slots [0, kv_len) where slot j is visible to query (b, i) "
    "iff j <= positions[b, i] (and mask[b, i, j] when a mask is given: True = may attend); GQA maps "
    "query head h to kv head h // (H / Hkv)")
_op("paged_kv_write", "(cache: PagedKVCache, layer: int, k[N, Hkv, D], v[N, Hkv, D], slot_mapping[N]) -> None",
    "cache slot slot_mapping[i] (block slot // block_size, offset slot % block_size) of the layer takes k[i], v[i]")
_op("paged_attention", "(q[N, H, D], cache: PagedKVCache, layer: int, ctx: StepContext) -> o[N, H, D]",
    "the batched runtime's attention: token i of sequence b (ctx.query_start) attends to b's slots at "
    "positions <= ctx.positions[i], gathered through ctx.block_tables[b]; softmax(q k^T * D^-0.5) v, GQA "
    "as in attention. A step whose sequences all have the same chunk length T (ctx.chunk = T: decode, "
    "verify) is what the fused kernels take; ragged chunks (varlen prefill) may fall back to the reference")
_op("paged_rope_kv_write", "(qkv[N, (H + 2 Hkv) D], q_norm[D] | None, k_norm[D] | None, eps, cos[S, D] f32, "
    "sin[S, D] f32, ctx: StepContext, cache: PagedKVCache, layer: int) -> q[N, H, D]",
    "rope_kv_write on the paged cache: norms and RoPE at ctx.positions, then "
    "paged_kv_write(cache, layer, k, v, ctx.slot_mapping); returns q")
_op("hier_rope_kv_write", "(qkv[N, (H + 2 Hkv) D], q_norm[D] | None, k_norm[D] | None, eps, cos[S, D] f32, "
    "sin[S, D] f32, ctx: StepContext, cache: HierarchicalKVCache, layer: int) -> q[N, H, D]",
    "paged_rope_kv_write on the hierarchical cache: norms and RoPE at ctx.positions, k / v written to the "
    "full-precision copies of ctx.slot_mapping (block slot // G, pool slot cache.fp_index[block]), then the "
    "blocks in cache.step_quantize quantized (quasar.kv.hierarchical.quantize: keys per channel over the "
    "block, values per token over Gv channels) into this layer's planes; returns q")
_op("hier_attention", "(q[N, H, D], cache: HierarchicalKVCache, layer: int, ctx: StepContext, upper_only: bool) "
    "-> o[N, H, D]",
    "paged_attention on the hierarchical cache: token i (position p) of sequence b reads b's first "
    "quantized_blocks(p) = max(0, (p - R) // G) blocks dequantized from the planes (upper only: u * scale + "
    "min; both: u * scale + (l - 8) * scale / 16 + min) and its slots up to p past them at full precision")
