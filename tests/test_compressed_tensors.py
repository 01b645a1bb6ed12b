"""compressed-tensors round trip: llmcompressor quantizes a tiny random Qwen3 on the CPU (W8A8,
W4A16 sym and asym, groups of 32), Quasar loads each directory and matches transformers' own
loading of it; plus the unpacking helpers against compressed-tensors' own packer, the scheme
mapping of every llmcompressor preset, and the errors for checkpoints Quasar cannot run.

What transformers does with a W8A8 (int-quantized) directory: it decompresses the int8 weights
(codes * weight_scale) and wraps every quantized Linear in compressed-tensors' fake-quantized
forward, so the *activations are quantized dynamically per token* at inference, with
compressed-tensors' convention scale = max|x| / 127.5, round half to even, clamp [-128, 127].
Quasar (like vLLM and the NPU's npu_dynamic_quant) uses scale = max|x| / 127. So the W8A8 logits
are compared three ways: (1) the dequantized weights tensor by tensor (exact), (2) each Linear on
the very input transformers gave it, with compressed-tensors' rounding patched into Quasar's
reference op (exact), (3) whole-model logits with Quasar's own rounding, within the error that a
second, independent int8 rounding of the activations brings.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from quasar import quant
from quasar.engine import ModelRunner
from quasar.errors import CheckpointError, ConfigError, UnsupportedError
from quasar.quant import compressed_tensors as ct
from quasar.quant.format import QActivation
from tiny import load_quasar, make_tiny

# llmcompressor / compressed-tensors are imported inside the tests, not at collection: they
# import triton, and the Triton kernel tests must be the first to import it (TRITON_INTERPRET).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llmcompressor") is None or importlib.util.find_spec("compressed_tensors") is None,
    reason="needs llmcompressor and compressed-tensors (pip install 'quasar[quant]')")


def pack_to_int32(*a, **k):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32 as f
    return f(*a, **k)


def unpack_from_int32(*a, **k):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32 as f
    return f(*a, **k)

GROUP = 32
SCHEMES = {"W8A8": "w8a8-int8", "W4A16": "w4a16", "W4A16_ASYM": "w4a16"}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
T = 24   # tokens in the comparison prompt


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _calibration(n=4, length=16):
    from datasets import Dataset
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (length,), generator=g).tolist() for _ in range(n)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n})


def _quantize(base: Path, preset: str, out: Path) -> Path:
    """llmcompressor oneshot with the preset's QuantizationModifier (group size 32 for W4)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if preset == "W4A16_ASYM":
        # Offset each group of 32 weights so the zero points spread over the int4 range (plain
        # random weights are centred on 0 and would all get zero points near 0).
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                    n, k = mod.weight.shape
                    off = 0.3 * torch.randn(n, k // GROUP, 1, generator=g)
                    mod.weight.add_(off.expand(n, k // GROUP, GROUP).reshape(n, k))
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights.strategy == "group":
        scheme.weights.group_size = GROUP
    model = oneshot(model=model, dataset=_calibration(), recipe=QuantizationModifier(
        config_groups={"group_0": scheme}, ignore=["lm_head"]), num_calibration_samples=4,
        max_seq_length=16)
    model.save_pretrained(str(out), save_compressed=True)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    base = make_tiny(root, "qwen3", hidden_size=64, intermediate_size=128, head_dim=16)
    return {p: _quantize(base, p, root / p) for p in SCHEMES}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _quasar_logits(path, ids, **kw):
    q = ModelRunner(load_quasar(path, **kw))
    return q(ids, torch.arange(ids.shape[1]).view(1, -1), kv_len=ids.shape[1])


def _ct_quantize_per_token(orig):
    """Quasar's per-token activation quantizer with compressed-tensors' int8 convention."""
    def quantize(x, qtype):
        if qtype != "int8":
            return orig(x, qtype)
        xf = x.float()
        scale = xf.abs().amax(dim=-1, keepdim=True) / 127.5
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
        q = torch.round(xf / scale).clamp(-128, 127).to(torch.int8)
        return QActivation(q, scale, qtype, x.dtype)
    return quantize


def _patch_ct_rounding(monkeypatch):
    """compressed-tensors' int8 rounding in Quasar's per-token quantizer: the op
    (quasar.ops.reference) and the name the schemes' reference GEMMs call (quasar.quant.reference)."""
    import quasar.ops.reference as ref_ops
    import quasar.quant.reference as ref_gemm
    patched = _ct_quantize_per_token(ref_ops.quantize_per_token)
    monkeypatch.setattr(ref_ops, "quantize_per_token", patched)
    monkeypatch.setattr(ref_gemm, "quantize_per_token", patched)


# ------------------------------------------------------------------ what llmcompressor writes

def test_layout_of_what_llmcompressor_writes(ckpts):
    from safetensors import safe_open
    for preset, path in ckpts.items():
        cfg = json.loads((path / "config.json").read_text())
        qc = cfg["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
        assert ct.checkpoint_scheme(cfg, path) == SCHEMES[preset]
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        p = "model.layers.0.mlp.down_proj."            # N = 64, K = 128
        assert t["lm_head.weight"].dtype == torch.float32    # ignored: stays in the model dtype
        if preset == "W8A8":
            assert qc["format"] == "int-quantized"
            assert t[p + "weight"].dtype == torch.int8 and t[p + "weight"].shape == (64, 128)
            assert t[p + "weight_scale"].dtype == torch.float32 and t[p + "weight_scale"].shape == (64, 1)
            assert not any(k.endswith(("input_scale", "weight_zero_point")) for k in t)
            # scale = max|w| / 127.5, so -128 is a code llmcompressor uses
            assert int(t[p + "weight"].min()) >= -128
        else:
            assert qc["format"] == "pack-quantized"
            assert t[p + "weight_packed"].dtype == torch.int32 and t[p + "weight_packed"].shape == (64, 16)
            assert t[p + "weight_scale"].shape == (64, 128 // GROUP)
            assert t[p + "weight_shape"].tolist() == [64, 128]
            if preset == "W4A16_ASYM":   # zero points: int4, packed 8 per int32 along N
                assert t[p + "weight_zero_point"].dtype == torch.int32
                assert t[p + "weight_zero_point"].shape == (64 // 8, 128 // GROUP)
            else:
                assert p + "weight_zero_point" not in t


def test_asym_zero_points_follow_compressed_tensors(ckpts):
    """zero points unpack (along N) to what the library's own unpacker gives, signed in
    [-8, 7], and they vary (the test would not see a swapped sign or offset otherwise)."""
    from safetensors import safe_open
    from quasar.model.loader import SafetensorsSource
    path = ckpts["W4A16_ASYM"]
    cfg = json.loads((path / "config.json").read_text())
    src = SafetensorsSource(path)
    p = "model.layers.1.mlp.gate_proj"
    qw = ct.load_linear(src, p, 128, 64, cfg)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        zp = unpack_from_int32(f.get_tensor(p + ".weight_zero_point"), 4, torch.Size([128, 2]), packed_dim=0)
        codes = unpack_from_int32(f.get_tensor(p + ".weight_packed"), 4, torch.Size([128, 64]))
    assert qw.zero is not None and qw.zero.dtype == torch.int8 and qw.zero.shape == (128, 2)
    assert torch.equal(qw.zero, zp) and torch.equal(qw.codes, codes)
    assert qw.group_size == GROUP and qw.bits == 4
    assert len(qw.zero.unique()) >= 5 and qw.zero.min() >= -8 and qw.zero.max() <= 7


# ------------------------------------------------------------------ logits against transformers

@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM"])
def test_w4a16_logits_match_transformers(ckpts, ids, preset):
    path = ckpts[preset]
    ref = _hf(path)(ids).logits
    q = load_quasar(path)
    assert q.scheme == "w4a16"
    out = ModelRunner(q)(ids, torch.arange(T).view(1, -1), kv_len=T)
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("preset", list(SCHEMES))
def test_dequantized_weights_match_transformers(ckpts, ids, preset):
    """Quasar's canonical weights, dequantized in float64, equal the float weights transformers +
    compressed-tensors decompress the same directory to, matrix by matrix."""
    from quasar.model.loader import SafetensorsSource
    path = ckpts[preset]
    hf = _hf(path)
    hf(ids[:, :2])                                     # the first forward decompresses
    cfg = json.loads((path / "config.json").read_text())
    src = SafetensorsSource(path)
    mods = dict(hf.named_modules())
    for i in range(2):
        for name in LINEARS:
            p = f"model.layers.{i}.{name}"
            w_hf = mods[p].weight.detach().double()
            qw = ct.load_linear(src, p, *w_hf.shape, cfg)
            assert qw.group_size == (-1 if preset == "W8A8" else GROUP)
            assert (qw.dequantize(torch.float64) - w_hf).abs().max() <= 1e-6 * w_hf.abs().max(), p


def test_w8a8_each_linear_matches_transformers_on_its_input(ckpts, ids, monkeypatch):
    """With compressed-tensors' activation rounding, Quasar's W8A8 GEMM on the input that
    transformers gave each Linear reproduces that Linear's output (fp32 rounding only)."""
    from quasar.model.loader import SafetensorsSource
    path = ckpts["W8A8"]
    hf = _hf(path)
    seen = {}
    for name, mod in hf.named_modules():
        if name.endswith(LINEARS):
            mod.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, (a[0], o)))
    hf(ids)
    _patch_ct_rounding(monkeypatch)
    cfg = json.loads((path / "config.json").read_text())
    src = SafetensorsSource(path)
    assert len(seen) == 14
    for name, (x, y) in seen.items():
        qw = ct.load_linear(src, name, y.shape[-1], x.shape[-1], cfg)
        got = quant.get("w8a8-int8").reference_gemm(x.reshape(-1, x.shape[-1]), qw).view_as(y)
        assert rel(got, y) <= 1e-5, name


def test_w8a8_logits_match_transformers(ckpts, ids, monkeypatch):
    path = ckpts["W8A8"]
    hf = _hf(path)
    ref = hf(ids).logits                       # fake-quantized per-token int8 activations
    for m in hf.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    ref_float = hf(ids).logits                 # the same dequantized weights, float activations
    act_rounding = rel(ref, ref_float)
    assert act_rounding > 1e-3                 # transformers does quantize the activations

    q = load_quasar(path)
    assert q.scheme == "w8a8-int8"
    out = ModelRunner(q)(ids, torch.arange(T).view(1, -1), kv_len=T)
    # Quasar rounds the activations on another grid (max|x|/127 vs /127.5): two independent
    # roundings differ by about sqrt(2) times one rounding's error.
    assert rel(out, ref) <= 2.5 * act_rounding
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75

    # With compressed-tensors' rounding patched in, the logits agree to fp32 precision up to the
    # first position where a last-bit fp32 difference upstream flips one activation code (a
    # flip then spreads to later positions through attention): much closer than Quasar's own
    # rounding, and well within one rounding's error. Each Linear agrees exactly (test above).
    _patch_ct_rounding(monkeypatch)
    same = _quasar_logits(path, ids)
    assert rel(same, ref) <= 0.6 * act_rounding
    assert rel(same, ref) < rel(out, ref)
    assert ((same[0] - ref[0]).norm(dim=-1) / ref[0].norm(dim=-1))[0] <= 1e-5   # position 0


# ------------------------------------------------------------------ unpacking vs the library

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [64, 40, 13])
def test_unpack_matches_compressed_tensors_packer(bits, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (19, k), generator=g, dtype=torch.int8)
    packed = pack_to_int32(codes, bits)
    assert packed.shape == (19, -(-k * bits // 32))
    assert torch.equal(ct.unpack_int32(packed, bits, k), codes)
    assert torch.equal(ct.unpack_int32(packed, bits, k), unpack_from_int32(packed, bits, codes.shape))


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_points_packed_along_n_unpack(bits):
    """compressed-tensors packs asymmetric zero points along N (dim 0): [ceil(N*b/32), G]."""
    n, groups = 13, 3
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    zp = torch.randint(lo, hi + 1, (n, groups), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    packed = pack_to_int32(zp, bits, packed_dim=0)
    assert packed.shape == (-(-n * bits // 32), groups)
    assert torch.equal(ct.unpack_int32(packed.T.contiguous(), bits, n).T, zp)


def _write_layer(tmp: Path, tensors: dict, weights: dict, fmt: str) -> tuple[object, dict]:
    from safetensors.torch import save_file
    from quasar.model.loader import SafetensorsSource
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": fmt,
                                   "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                                 "input_activations": None}}}}
    return SafetensorsSource(tmp), cfg


@pytest.mark.parametrize("bits,n,k,gs,sym", [(4, 20, 64, 32, False), (4, 20, 64, -1, False),
                                             (8, 12, 96, 32, False), (4, 20, 48, 16, True)])
def test_pack_quantized_layer_as_the_library_writes_it(tmp_path, bits, n, k, gs, sym):
    """A layer compressed by compressed-tensors' own PackedQuantizationCompressor (N not a
    multiple of 8, so the zero-point words are partly filled) loads to the weights the library's
    decompressor returns."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    g = torch.Generator().manual_seed(n + k + bits)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                            strategy="group" if gs > 0 else "channel", group_size=gs if gs > 0 else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = k // gs if gs > 0 else 1
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    sd = {"weight": torch.randn(n, k, generator=g) + 0.5,
          "weight_scale": torch.rand(n, groups, generator=g) * 0.1 + 0.01}
    if not sym:
        sd["weight_zero_point"] = torch.randint(lo, hi + 1, (n, groups), generator=g, dtype=torch.int8)
    comp = PackedQuantizationCompressor.compress(sd, scheme)
    want = PackedQuantizationCompressor.decompress(comp, scheme)["weight"]
    src, cfg = _write_layer(tmp_path, {f"l.{k2}": v for k2, v in comp.items()},
                            json.loads(args.model_dump_json()), "pack-quantized")
    qw = ct.load_linear(src, "l", n, k, cfg)
    assert (qw.zero is None) == sym and qw.group_size == gs
    assert torch.allclose(qw.dequantize(torch.float64), want.double(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ scheme mapping

def _preset_config(name: str, fmt: str, **over) -> dict:
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(name, ["Linear"])},
                            format=fmt, ignore=["lm_head"], quantization_status="compressed")
    d = json.loads(qc.model_dump_json())
    d.update(over)
    return {"quantization_config": d}


@pytest.mark.parametrize("preset,fmt,scheme", [
    ("W8A8", "int-quantized", "w8a8-int8"), ("INT8", "int-quantized", "w8a8-int8"),
    ("W4A16", "pack-quantized", "w4a16"), ("W4A16_ASYM", "pack-quantized", "w4a16"),
    ("FP8_DYNAMIC", "float-quantized", "w8a8-fp8"), ("W8A16", "pack-quantized", "w8a16"),
    ("W4A16", "naive-quantized", "w4a16")])
def test_presets_map_to_quasar_schemes(preset, fmt, scheme):
    assert ct.checkpoint_scheme(_preset_config(preset, fmt)) == scheme
    assert ct.PRESETS.get(preset, scheme) == scheme


@pytest.mark.parametrize("preset,fmt", [
    ("FP8", "float-quantized"), ("FP8_BLOCK", "float-quantized"), ("W4A8", "int-quantized"),
    ("W4AFP8", "pack-quantized"), ("NVFP4", "nvfp4-pack-quantized"), ("W4A4", "int-quantized"),
    ("W8A8", "dense"), ("MXFP4", "mxfp4-pack-quantized")])
def test_unsupported_presets_say_what_is_supported(preset, fmt):
    with pytest.raises(UnsupportedError, match="Quasar supports W8A8"):
        ct.checkpoint_scheme(_preset_config(preset, fmt), "/ckpt")


def test_unsupported_variants():
    cfg = _preset_config("W8A8", "int-quantized")
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    with pytest.raises(UnsupportedError, match="dynamic"):
        ct.checkpoint_scheme(cfg)
    cfg = _preset_config("W4A16", "pack-quantized")
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    with pytest.raises(UnsupportedError, match="actorder"):
        ct.checkpoint_scheme(cfg)
    kv = _preset_config("W8A8", "int-quantized")["quantization_config"]["config_groups"]["group_0"]["weights"]
    with pytest.raises(UnsupportedError, match="KV cache"):
        ct.checkpoint_scheme(_preset_config("W8A8", "int-quantized", kv_cache_scheme=kv))
    mixed = _preset_config("W8A8", "int-quantized")
    mixed["quantization_config"]["config_groups"]["group_1"] = \
        _preset_config("W4A16", "pack-quantized")["quantization_config"]["config_groups"]["group_0"]
    with pytest.raises(UnsupportedError, match="mixed precision"):
        ct.checkpoint_scheme(mixed)
    assert ct.checkpoint_scheme({"architectures": ["Qwen3ForCausalLM"]}) is None


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "bitsandbytes"])
def test_unknown_quant_method_is_unsupported(method):
    with pytest.raises(UnsupportedError, match=f"quantization method '{method}' is not supported"):
        ct.checkpoint_scheme({"quantization_config": {"quant_method": method, "bits": 4}}, "/ckpt")


# ------------------------------------------------------------------ errors at load time

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_yaml_asking_for_another_scheme_is_a_config_error(ckpts):
    with pytest.raises(ConfigError, match=r"w8a8-int8 compressed-tensors checkpoint but verifier.quant asks for 'w4a16'"):
        load_quasar(ckpts["W8A8"], quant="w4a16")
    assert load_quasar(ckpts["W8A8"], quant="w8a8-int8").scheme == "w8a8-int8"   # the same one is fine


def test_unknown_quant_method_in_a_checkpoint(ckpts, tmp_path):
    d = _copy(ckpts["W4A16"], tmp_path / "awq")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match=r"config.json: quantization method 'awq' is not supported"):
        load_quasar(d)


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_corrupt_safetensors_names_the_file(ckpts, tmp_path, damage):
    d = _copy(ckpts["W4A16"], tmp_path / damage.replace(" ", "_"))
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=str(f)):
        load_quasar(d)


def test_layer_left_unquantized_is_a_clear_error(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(ckpts["W4A16"], tmp_path / "partial")
    sd = load_file(str(d / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj."
    for s in ("weight_packed", "weight_scale", "weight_shape"):
        del sd[p + s]
    sd[p + "weight"] = torch.randn(64, 128)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedError, match=r"model.layers.1.mlp.down_proj.weight is unquantized"):
        load_quasar(d)


def test_mis_shaped_scale_is_a_checkpoint_error(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(ckpts["W4A16_ASYM"], tmp_path / "badscale")
    sd = load_file(str(d / "model.safetensors"))
    p = "model.layers.0.self_attn.o_proj."
    sd[p + "weight_scale"] = sd[p + "weight_scale"][:, :1].contiguous()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj.weight_scale has shape \(64, 1\)"):
        load_quasar(d)
