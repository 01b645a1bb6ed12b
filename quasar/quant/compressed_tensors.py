"""compressed-tensors checkpoints (what llmcompressor writes) -> canonical QuantizedWeight.

What llmcompressor 0.14 / compressed-tensors 0.19 write, per quantized Linear `P` (checked against
real `oneshot` outputs in tests/test_compressed_tensors.py and tests/test_quantize_tool.py):

- `int-quantized` (preset W8A8: int8 symmetric per-channel weights, dynamic symmetric per-token
  int8 activations): `P.weight` int8 [N, K] and `P.weight_scale` [N, 1] in the model's dtype.
  Nothing is stored for the dynamic activations. Weight scales are max|w| / 127.5 (the int8
  range's half-width), so codes span [-128, 127].
- `pack-quantized` (presets W4A16, W4A16_ASYM, W8A16: weights only, groups of 128 along K by
  default): `P.weight_packed` int32 [N, ceil(K*b/32)] (element i of a row at bits i*b of the row's
  little-endian bit string, each code stored as the unsigned q + 2^(b-1)), `P.weight_scale`
  [N, K/G] in the model's dtype, `P.weight_shape` int64 [2] = (N, K), and, asymmetric only,
  `P.weight_zero_point` int32 [ceil(N*b/32), K/G]: signed int-b zero points packed the same way
  but along N (dim 0). Dequantization is w = (q - zp) * scale with q, zp signed in
  [-2^(b-1), 2^(b-1) - 1] -- the canonical (codes - zero) * scale, unchanged.
- `float-quantized` (preset FP8_DYNAMIC): `P.weight` float8_e4m3fn [N, K], `P.weight_scale` [N, 1].
- `naive-quantized` (older writers, any int width): `P.weight` int8 [N, K] codes, and for
  asymmetric schemes `P.weight_zero_point` int8 [N, K/G] unpacked.

Layers in the recipe's `ignore` list (lm_head) keep a plain float `weight`.

The scheme comes from config.json's `quantization_config`, never from the user's YAML. The
module needs neither compressed-tensors nor llmcompressor at run time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from quasar.errors import CheckpointError, UnsupportedError
from .format import QuantizedWeight

# Preset -> scheme, for the error messages and the docs (the mapping itself reads the args).
PRESETS = {"W8A8": "w8a8-int8", "INT8": "w8a8-int8", "FP8_DYNAMIC": "w8a8-fp8", "W8A16": "w8a16",
           "W4A16": "w4a16", "W4A16_ASYM": "w4a16"}
_SUPPORTED = ("W8A8 (int8 per-channel weights, dynamic per-token int8 activations) -> w8a8-int8; "
              "FP8_DYNAMIC -> w8a8-fp8; W8A16 (symmetric) -> w8a16; W4A16 / W4A16_ASYM -> w4a16")
_FORMATS = ("int-quantized", "pack-quantized", "float-quantized", "naive-quantized")
_ACT_FIELDS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale",
               "output_zero_point")


def _groups(qc: dict, src: str) -> list[dict]:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise UnsupportedError(f"{src}: quantization_config has no config_groups; nothing says how "
                               "the weights are quantized")
    key = lambda g: (g.get("weights"), g.get("input_activations"), g.get("output_activations"))
    if any(key(g) != key(groups[0]) for g in groups[1:]):
        raise UnsupportedError(
            f"{src}: the checkpoint quantizes layers with {len(groups)} different schemes "
            "(mixed precision); Quasar runs one scheme for every decoder Linear")
    return groups


def _group(qc: dict, src: str = "config.json") -> dict:
    return _groups(qc, src)[0]


def _fmt(qc: dict, g: dict) -> Optional[str]:
    fmt = g.get("format") or qc.get("format")
    return None if fmt == "mixed-precision" else fmt


def checkpoint_scheme(hf_config: dict, path: Path | str = "") -> Optional[str]:
    """The Quasar scheme a quantized checkpoint carries, or None for a float checkpoint.

    W8A8 -> w8a8-int8, FP8_DYNAMIC -> w8a8-fp8, W8A16 -> w8a16, W4A16 / W4A16_ASYM -> w4a16;
    anything else is an UnsupportedError that says what the checkpoint holds."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    src = f"{Path(path) / 'config.json'}"
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise UnsupportedError(f"{src}: quantization method {method!r} is not supported; Quasar reads "
                               "compressed-tensors checkpoints (llmcompressor, tools/quantize.py) or "
                               "quantizes bf16 checkpoints itself (verifier.quant)")
    g = _group(qc, src)
    fmt = _fmt(qc, g)
    w = g.get("weights") or {}
    a = g.get("input_activations")
    what = f"format {fmt!r}, weights {_brief(w)}, activations {_brief(a)}"

    def unsupported(why: str):
        return UnsupportedError(f"{src}: {why} ({what}); Quasar supports {_SUPPORTED}")

    if fmt not in _FORMATS:
        hint = (" the weights were saved uncompressed: save with save_compressed=True"
                if fmt == "dense" else "")
        raise unsupported(f"compressed-tensors format {fmt!r} is not supported;{hint}".rstrip(";"))
    if qc.get("sparsity_config"):
        raise unsupported("sparse checkpoints are not supported")
    if qc.get("transform_config"):
        raise unsupported("checkpoints with online transforms (SpinQuant / QuIP rotations) are not "
                          "supported")
    if qc.get("kv_cache_scheme"):
        raise unsupported("a quantized KV cache (kv_cache_scheme) is not supported; Quasar keeps the "
                          "KV cache in the model dtype")
    if g.get("output_activations"):
        raise unsupported("output activation quantization is not supported")
    if not w:
        raise unsupported("the scheme does not quantize weights")
    bits, wtype, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
    sym = w.get("symmetric", True)
    if w.get("actorder") in ("group", "dynamic"):
        raise unsupported("GPTQ activation ordering 'group' (weight_g_idx) is not supported; "
                          "quantize with actorder='static' (the llmcompressor default)")
    if strategy == "group" and not w.get("group_size"):
        raise unsupported("group strategy without a group_size")
    if a is not None:
        if not (a.get("dynamic") is True and a.get("strategy") == "token" and a.get("symmetric", True)
                and a.get("num_bits") == 8):
            raise unsupported("only dynamic symmetric per-token 8-bit activations are supported "
                              "(static or per-tensor activation scales are not)")
        if wtype == "float" and bits == 8 and a.get("type") == "float" and strategy in ("channel", "tensor"):
            return "w8a8-fp8"
        if wtype == "int" and bits == 8 and a.get("type", "int") == "int" and sym \
                and strategy in ("channel", "tensor"):
            return "w8a8-int8"
        raise unsupported("no Quasar scheme runs these weights with 8-bit activations")
    if wtype == "int" and bits == 4 and strategy in ("group", "channel"):
        return "w4a16"
    if wtype == "int" and bits == 8 and sym and strategy in ("group", "channel"):
        return "w8a16"
    raise unsupported("no Quasar scheme matches these weights")


def _brief(args: Optional[dict]) -> str:
    if not args:
        return "none"
    keys = ("type", "num_bits", "strategy", "group_size", "symmetric", "dynamic")
    return "{" + ", ".join(f"{k}={args.get(k)}" for k in keys if args.get(k) is not None) + "}"


def unpack_int32(packed: torch.Tensor, bits: int, n_out: int) -> torch.Tensor:
    """Inverse of compressed_tensors' pack_to_int32 along the last dim -> signed int8 codes.

    Element i of a row sits at bits [i*b, i*b + b) of the row's little-endian bit string, stored
    as the unsigned value q + 2^(b-1). For b dividing 32 no element straddles two words, so the
    word-wise shift below is the whole story."""
    if bits < 1 or 32 % bits:
        raise UnsupportedError(f"unpacking {bits}-bit codes is not supported (only widths that divide 32)")
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)   # [..., W, per]
    vals = vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n_out]
    return (vals - (1 << (bits - 1))).to(torch.int8)


def _words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def load_linear(src, prefix: str, n: int, k: int, hf_config: dict) -> QuantizedWeight:
    """One quantized Linear `prefix` of a compressed-tensors checkpoint as a canonical weight.

    src: quasar.model.loader.SafetensorsSource. n, k: the out / in features the model config
    implies; every tensor is checked against them."""
    qc = hf_config["quantization_config"]
    g = _group(qc)
    w = g["weights"]
    bits, strategy = int(w["num_bits"]), w.get("strategy")
    sym = w.get("symmetric", True)
    is_float = w.get("type", "int") == "float"
    where = f"{src.path}: {prefix}"
    pack_zp = False
    if prefix + ".weight_packed" in src:
        packed = src.get(prefix + ".weight_packed")
        if packed.dtype != torch.int32 or tuple(packed.shape) != (n, _words(k, bits)):
            raise CheckpointError(f"{where}.weight_packed is {packed.dtype} {tuple(packed.shape)}; "
                                  f"{bits}-bit codes of a {(n, k)} weight pack to int32 {(n, _words(k, bits))}")
        if prefix + ".weight_shape" in src:
            shape = tuple(int(s) for s in src.get(prefix + ".weight_shape").tolist())
            if shape != (n, k):
                raise CheckpointError(f"{where}.weight_shape is {shape}, the model config implies {(n, k)}")
        codes = unpack_int32(packed, bits, k)
        pack_zp = strategy in ("group", "channel")
    elif prefix + ".weight" in src:
        codes = src.get(prefix + ".weight", (n, k))
        if codes.is_floating_point() and codes.dtype != torch.float8_e4m3fn:
            raise UnsupportedError(
                f"{where}.weight is unquantized ({codes.dtype}): the checkpoint left this layer out "
                f"of its scheme (ignore: {qc.get('ignore')}); Quasar needs every decoder Linear "
                "quantized the same way (only lm_head may be ignored)")
        want = torch.float8_e4m3fn if is_float else torch.int8
        if codes.dtype != want:
            raise CheckpointError(f"{where}.weight has dtype {codes.dtype}; this scheme stores {want} codes")
        if not is_float and bits < 8:
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
                raise CheckpointError(f"{where}.weight holds codes outside the {bits}-bit range [{lo}, {hi}]")
    else:
        raise CheckpointError(f"{where}: neither weight_packed nor weight is in the checkpoint")

    scale = src.get(prefix + ".weight_scale")
    if not scale.is_floating_point():
        raise CheckpointError(f"{where}.weight_scale has dtype {scale.dtype}; expected a float tensor")
    scale = scale.float()
    if strategy == "tensor" and scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1).contiguous()
    elif scale.dim() == 1 and scale.shape[0] == n:
        scale = scale[:, None]
    if strategy == "group":
        gs = int(w["group_size"])
        if k % gs:
            raise UnsupportedError(f"{where}: group_size {gs} does not divide the in-features {k}; "
                                   "Quasar needs whole groups (quantize with a group size that divides K)")
        groups, group_size = k // gs, gs
    else:
        groups, group_size = 1, -1
    if tuple(scale.shape) != (n, groups):
        raise CheckpointError(f"{where}.weight_scale has shape {tuple(scale.shape)}; a {strategy} "
                              f"scheme on a {(n, k)} weight has {(n, groups)}")

    zero = None
    if prefix + ".weight_zero_point" in src:
        zp = src.get(prefix + ".weight_zero_point")
        if pack_zp and not sym:     # packed along N: int32 [ceil(N*b/32), G]
            if zp.dtype != torch.int32 or tuple(zp.shape) != (_words(n, bits), groups):
                raise CheckpointError(f"{where}.weight_zero_point is {zp.dtype} {tuple(zp.shape)}; "
                                      f"{bits}-bit zero points packed along N are int32 "
                                      f"{(_words(n, bits), groups)}")
            zp = unpack_int32(zp.T.contiguous(), bits, n).T.contiguous()
        else:
            if zp.is_floating_point():
                zp = zp.round()
            if zp.numel() == groups * n:
                zp = zp.reshape(n, groups)
            elif zp.numel() == 1:
                zp = zp.reshape(1, 1).expand(n, groups)
            else:
                raise CheckpointError(f"{where}.weight_zero_point has shape {tuple(zp.shape)}, "
                                      f"expected {(n, groups)}")
            zp = zp.to(torch.int8).contiguous()
        if sym:
            if zp.any():    # older writers kept an all-zero zero point for symmetric schemes
                raise CheckpointError(f"{where}.weight_zero_point is non-zero but the config says "
                                      "the weights are symmetric")
        else:
            zero = zp
    elif not sym:
        raise CheckpointError(f"{where}.weight_zero_point is missing; the config says the weights "
                              "are asymmetric")

    if prefix + ".weight_g_idx" in src:   # activation order kept only as a permutation of groups
        gidx = src.get(prefix + ".weight_g_idx").long()
        gsz = k // groups
        if gidx.shape != (k,) or not torch.equal(gidx, torch.arange(k) // gsz):
            raise UnsupportedError(f"{where}.weight_g_idx reorders the groups (GPTQ actorder='group'); "
                                   "quantize with actorder='static'")
    a = g.get("input_activations")
    if a is None or a.get("dynamic") is True:   # nothing static to use; accept leftovers
        for f in _ACT_FIELDS:
            if f"{prefix}.{f}" in src:
                src.used.add(f"{prefix}.{f}")
    return QuantizedWeight(codes.contiguous(), scale, bits=bits, group_size=group_size, zero=zero)
