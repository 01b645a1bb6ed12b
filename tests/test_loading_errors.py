"""Bad checkpoints get errors that name the file and the tensor (never a deep torch traceback)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quasar.errors import CheckpointError, UnsupportedError
from quasar.fetch import resolve_model
from tiny import load_quasar, make_tiny

from quasar.engine import ModelRunner


@pytest.fixture()
def model_dir(tiny_root, tmp_path):
    src = make_tiny(tiny_root, "llama")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **kv):
    c = json.loads((d / "config.json").read_text())
    c.update(kv)
    (d / "config.json").write_text(json.dumps(c))


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="not found: give an embedded model name"):
        resolve_model("no-such-model")


def test_unsupported_model_type(model_dir):
    _edit_config(model_dir, model_type="mamba", architectures=["MambaForCausalLM"])
    with pytest.raises(UnsupportedError, match="model_type 'mamba'.*supported: llama, qwen2, qwen3"):
        load_quasar(model_dir)


def test_missing_safetensors(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="contains no \\*.safetensors"):
        load_quasar(model_dir)


def test_corrupt_safetensors_names_the_file(model_dir):
    f = model_dir / "model.safetensors"
    f.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load_quasar(model_dir)


def test_truncated_safetensors_names_the_file(model_dir):
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quasar(model_dir)


def test_missing_tensor_is_named(model_dir):
    f = model_dir / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_quasar(model_dir)


def test_shape_mismatch_names_file_and_tensor(model_dir):
    _edit_config(model_dir, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' "
                                              r"has shape \(128, 64\), the config implies \(96, 64\)"):
        load_quasar(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    f = model_dir / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="unexpected tensors.*mlp.extra.weight"):
        load_quasar(model_dir)


def test_sharded_checkpoint_loads_and_missing_shard_is_named(tiny_root, tmp_path):
    src = make_tiny(tiny_root, "qwen3")
    d = tmp_path / "sharded"
    shutil.copytree(src, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    wmap = {}
    for i, chunk in enumerate([names[:half], names[half:]]):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in chunk}, str(d / fn))
        wmap.update({n: fn for n in chunk})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    ref = ModelRunner(load_quasar(src))
    got = ModelRunner(load_quasar(d))
    ids = torch.arange(10).view(1, -1)
    pos = torch.arange(10).view(1, -1)
    ref_sd, got_sd = ref.model.state_dict(), got.model.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    # same weights; the logits may differ in the last bit (BLAS picks kernels by alignment)
    torch.testing.assert_close(ref(ids, pos, 10), got(ids, pos, 10), rtol=1e-5, atol=1e-5)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is listed .* does not exist"):
        load_quasar(d)


def test_pangu_directory_loads_with_inv_freq_skipped(tiny_root):
    d = make_tiny(tiny_root, "pangu")
    c = json.loads((d / "config.json").read_text())
    assert c["architectures"] == ["PanguEmbeddedForCausalLM"] and c["bias"] is True
    assert c["rope_theta"] == 1.6e7 and c["rms_norm_eps"] == 1e-5
    assert any("rotary_emb.inv_freq" in n for n in load_file(str(d / "model.safetensors")))
    m = load_quasar(d)
    assert m.args.family == "pangu_embedded" and m.args.o_bias and m.args.qkv_bias
    assert m.layers[0].attn.o_proj.bias is not None


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_gguf_conversion_names_a_missing_package(tmp_path, monkeypatch, missing):
    """transformers needs both gguf and accelerate to read a GGUF: a clean install without one
    gets a one-line error naming the package and the extra, not transformers' traceback."""
    import sys

    from quasar.model import gguf as qg
    monkeypatch.setitem(sys.modules, missing, None)         # `import <missing>` -> ImportError
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=rf"needs the {missing} package.*quasar\[gguf\]"):
        qg.convert(f, tmp_path / "out")
