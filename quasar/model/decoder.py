"""One dense decoder for Qwen3, OpenPangu-Embedded, Qwen2 and Llama, chosen by ModelArgs.

`forward(input_ids[B, T], positions[B, T], cache, kv_len)` serves prefill, one-token decode and a
chunk of k+1 tokens verified against the cache; the model holds no cache and no step runner (the
engine's ModelRunner owns both). Every hardware-specific op goes through the
backend; linears are quasar.quant layers holding backend-prepared weights. QKV and gate/up are
concatenated at load time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quasar.quant import QuantLinear
from quasar.kv import KVCache
from quasar.kv.dense import DenseStep
from .args import ModelArgs


def rope_table(args: ModelArgs, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] in fp32, as transformers computes them for default RoPE."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float().to(device) / d))
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, qkv_proj: QuantLinear, o_proj: QuantLinear,
                 q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor], backend):
        super().__init__()
        self.layer_idx = layer_idx
        self.args = args
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.backend = backend

    def forward(self, h, cos, sin, cache, step, draft: bool = False):
        """h [M, hidden]; cache: a KV cache representation (quasar.kv), which runs the attention
        prologue (q/k norms, RoPE, the cache write: one fused op) and the attention through the
        backend for the step's metadata (`step`: dense positions/kv_len, or a paged StepContext)."""
        a = self.args
        qkv = self.qkv_proj(h, draft)
        q = cache.prologue(self.backend, self.layer_idx, qkv, self.q_norm, self.k_norm, a.rms_norm_eps,
                           cos, sin, step)
        o = cache.attend(self.backend, self.layer_idx, q, step, draft)
        return self.o_proj(o.reshape(qkv.shape[0], a.num_heads * a.head_dim), draft)


class MLP(nn.Module):
    def __init__(self, gate_up_proj: QuantLinear, down_proj: QuantLinear, backend):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.backend = backend

    def forward(self, h, draft: bool = False):
        gu = self.gate_up_proj(h, draft)
        qtype = self.down_proj.fused_act_qtype(draft)
        act = self.backend.silu_mul_quant(gu, qtype) if qtype else self.backend.silu_mul(gu)
        return self.down_proj(act, draft)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, attn: Attention, mlp: MLP, input_norm, post_norm, backend):
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_norm = input_norm, post_norm
        self.eps = args.rms_norm_eps
        self.backend = backend

    def _norm(self, x, delta, w, consumer: QuantLinear, draft: bool):
        """(norm(x + delta), x + delta): the residual add fused into the norm (delta None: x)."""
        qtype = consumer.fused_act_qtype(draft)
        if delta is not None:
            return self.backend.add_rms_norm(x, delta, w, self.eps, qtype)
        if qtype:
            return self.backend.rms_norm_quant(x, w, self.eps, qtype), x
        return self.backend.rms_norm(x, w, self.eps), x

    def forward(self, x, delta, cos, sin, cache, step, draft: bool = False):
        """x: the residual stream [M, hidden] (M = B*T rows) still owed `delta` (the previous
        block's MLP output, or None). Returns (x, delta) the same way: the caller adds delta."""
        h, x = self._norm(x, delta, self.input_norm, self.attn.qkv_proj, draft)
        delta = self.attn(h, cos, sin, cache, step, draft)
        h, x = self._norm(x, delta, self.post_norm, self.mlp.gate_up_proj, draft)
        return x, self.mlp(h, draft)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, embed: torch.Tensor, blocks: list[Block], norm: torch.Tensor,
                 lm_head: QuantLinear, backend, dtype: torch.dtype, max_seq_len: int):
        super().__init__()
        self.args = args
        self.embed = embed
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = lm_head
        self.backend = backend
        self.dtype = dtype
        self.device = backend.device
        self.max_seq_len = max_seq_len
        self.cos, self.sin = rope_table(args, max_seq_len, backend.device)
        self.scheme = self.draft_scheme = None
        self.path = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int,
                mask: Optional[torch.Tensor] = None, last_only: bool = False, mode: str = "verify") -> torch.Tensor:
        """input_ids, positions: [B, T]; cache: the KV cache (made and owned by the engine's
        ModelRunner); kv_len: cache slots to attend over (> max position). Returns logits
        [B, T, vocab] (fp32), or [B, 1, vocab] with last_only (prefill). mode: "draft" runs the
        quantized layers' draft scheme (QSpec), anything else the verifier's."""
        bsz, t = input_ids.shape
        rows = torch.arange(t - 1, bsz * t, t, device=input_ids.device) if last_only else None
        logits = self.run(input_ids.reshape(-1), cache, DenseStep(positions, kv_len, mask), rows, mode)
        return logits.view(bsz, 1 if last_only else t, -1)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, cache, step, rows: Optional[torch.Tensor] = None,
            mode: str = "verify") -> torch.Tensor:
        """The step on any cache representation: input_ids [M] (the step's tokens, flattened),
        `step` the cache's metadata (DenseStep, or the paged cache's StepContext). Returns fp32
        logits [M, vocab], or [len(rows), vocab] of the given rows only (the rest skip the head).
        mode "draft" runs the draft scheme of the quantized layers (QSpec)."""
        draft = mode == "draft"
        x = self.embed[input_ids]
        delta = None
        for block in self.layers:
            x, delta = block(x, delta, self.cos, self.sin, cache, step, draft)
        if rows is not None:
            x = x.index_select(0, rows)
            delta = None if delta is None else delta.index_select(0, rows)
        if delta is None:       # no layers (a pruning experiment taken to the end)
            x = self.backend.rms_norm(x, self.norm, self.args.rms_norm_eps)
        else:
            x, _ = self.backend.add_rms_norm(x, delta, self.norm, self.args.rms_norm_eps)
        return self.lm_head(x).float()
