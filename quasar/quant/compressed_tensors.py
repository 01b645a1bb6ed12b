"""compressed-tensors checkpoints (what llmcompressor writes) -> canonical QuantizedWeight.

Formats read:
- `int-quantized` (W8A8 int8): `weight` int8 [N, K], `weight_scale` [N, 1].
- `pack-quantized` (W4A16 / W8A16): `weight_packed` int32 [N, ceil(K*b/32)] (element i of a row
  at bits i*b of the row's bit string, stored offset by 2^(b-1)), `weight_scale` [N, K/G] (or
  [N, 1]), `weight_shape` [2], and for asymmetric schemes `weight_zero_point` packed the same way
  along N: int32 [ceil(N*b/32), G].
- `float-quantized` (W8A8 FP8): `weight` float8_e4m3fn [N, K], `weight_scale` [N, 1].

The scheme comes from config.json's `quantization_config`, never from the user's YAML.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from quasar.errors import CheckpointError, UnsupportedError
from .format import QuantizedWeight


def _group(qc: dict) -> dict:
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise UnsupportedError(f"compressed-tensors checkpoints with {len(groups)} config groups are "
                               "not supported (one scheme for every Linear)")
    return next(iter(groups.values()))


def checkpoint_scheme(hf_config: dict, path: Path | str = "") -> Optional[str]:
    """The scheme a quantized checkpoint carries, or None for a float checkpoint."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    src = f"{Path(path) / 'config.json'}"
    if method != "compressed-tensors":
        raise UnsupportedError(f"{src}: quantization method {method!r} is not supported; Quasar reads "
                               "compressed-tensors checkpoints (llmcompressor) or quantizes bf16 "
                               "checkpoints itself (verifier.quant)")
    g = _group(qc)
    w, a = g.get("weights") or {}, g.get("input_activations")
    fmt = qc.get("format")
    bits, wtype = w.get("num_bits"), w.get("type", "int")
    if wtype == "float" and bits == 8 and a and a.get("type") == "float" and a.get("dynamic"):
        return "w8a8-fp8"
    if wtype == "int" and bits == 8 and a and a.get("num_bits") == 8 and a.get("dynamic") \
            and a.get("strategy") == "token":
        return "w8a8-int8"
    if wtype == "int" and a is None and bits == 4:
        return "w4a16"
    if wtype == "int" and a is None and bits == 8:
        return "w8a16"
    raise UnsupportedError(f"{src}: compressed-tensors scheme (format {fmt!r}, weights {w}, "
                           f"activations {a}) has no Quasar equivalent; supported: W8A8 int8 dynamic "
                           "per-token, W8A8 FP8 dynamic, W4A16 / W8A16 (sym or asym)")


def unpack_int32(packed: torch.Tensor, bits: int, n_out: int) -> torch.Tensor:
    """Inverse of compressed_tensors' pack_to_int32 along the last dim -> signed int8 codes."""
    per = 32 // bits
    if 32 % bits:
        raise UnsupportedError(f"unpacking {bits}-bit codes is not supported")
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)           # [..., W, per]
    vals = vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n_out]
    return (vals - (1 << (bits - 1))).to(torch.int8)


def load_linear(src, prefix: str, n: int, k: int, hf_config: dict) -> QuantizedWeight:
    g = _group(hf_config["quantization_config"])
    w = g["weights"]
    bits = w["num_bits"]
    strategy = w.get("strategy")
    where = f"{src.path}: {prefix}"
    if prefix + ".weight_packed" in src:
        packed = src.get(prefix + ".weight_packed").to(torch.int32)
        if prefix + ".weight_shape" in src:
            shape = tuple(int(s) for s in src.get(prefix + ".weight_shape").tolist())
            if shape != (n, k):
                raise CheckpointError(f"{where}.weight_shape is {shape}, the config implies {(n, k)}")
        codes = unpack_int32(packed, bits, k)
        if codes.shape != (n, k):
            raise CheckpointError(f"{where}.weight_packed unpacks to {tuple(codes.shape)}, expected {(n, k)}")
    elif prefix + ".weight" in src:
        codes = src.get(prefix + ".weight", (n, k))
        if codes.dtype not in (torch.int8, torch.float8_e4m3fn):
            raise CheckpointError(f"{where}.weight has dtype {codes.dtype}; a quantized checkpoint "
                                  "stores int8 or float8_e4m3fn codes")
    else:
        raise CheckpointError(f"{where}: neither weight_packed nor weight is in the checkpoint")
    scale = src.get(prefix + ".weight_scale").float()
    if scale.dim() == 1:
        scale = scale[:, None]
    groups = scale.shape[1]
    if scale.shape[0] != n or k % groups:
        raise CheckpointError(f"{where}.weight_scale has shape {tuple(scale.shape)}, incompatible with {(n, k)}")
    group_size = -1 if groups == 1 and strategy != "group" else k // groups
    zero = None
    if not w.get("symmetric", True):
        zp = src.get(prefix + ".weight_zero_point")
        if zp.dtype == torch.int32 and bits < 8:
            zero = unpack_int32(zp.T.contiguous(), bits, n).T.contiguous()   # packed along N
        else:
            zero = zp.to(torch.int8).reshape(n, groups)
        if tuple(zero.shape) != (n, groups):
            raise CheckpointError(f"{where}.weight_zero_point unpacks to {tuple(zero.shape)}, expected {(n, groups)}")
    return QuantizedWeight(codes, scale, bits=bits, group_size=group_size, zero=zero)
