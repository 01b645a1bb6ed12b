"""The YAML schema: unknown keys, wrong types and values get errors naming the key path."""
import pytest

from quasar import config as qc
from quasar.errors import ConfigError


def test_defaults_validate():
    c = qc.from_dict({})
    assert c.model == "smollm2-135m-instruct" and c.drafter.method == "none" and c.verifier.quant is None


def test_full_config_roundtrip():
    data = {"model": "x", "device": "cpu", "dtype": "bfloat16", "max_seq_len": 4096,
            "verifier": {"quant": "w8a8-int8", "group_size": 128, "lm_head_quant": "bf16"},
            "drafter": {"method": "ngram", "num_tokens": 5, "ngram": {"min": 1, "max": 3}},
            "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 1},
            "runtime": {"cuda_graphs": True}}
    c = qc.from_dict(data)
    assert qc.to_dict(c)["drafter"]["ngram"] == {"min": 1, "max": 3}
    assert c.sampling.temperature == 0.7 and c.runtime.cuda_graphs is True


@pytest.mark.parametrize("data,needle", [
    ({"drafter": {"num_tokens": "five"}}, "drafter.num_tokens must be an integer >= 1, got 'five'"),
    ({"drafter": {"num_tokens": 0}}, "drafter.num_tokens must be an integer >= 1, got 0"),
    ({"drafter": {"num_tokens": True}}, "drafter.num_tokens must be an integer"),
    ({"sampling": {"top_p": 1.5}}, "sampling.top_p must be a number in [0.0, 1.0], got 1.5"),
    ({"device": "gpu"}, "device must be one of 'auto', 'cpu', 'cuda', 'npu', got 'gpu'"),
    ({"verifier": {"quant": "w8a8_int8"}}, "did you mean 'w8a8-int8'"),
    ({"drafter": {"ngram": {"min": 3, "max": 2}}}, "drafter.ngram.min (3) must be <= drafter.ngram.max (2)"),
    ({"drafter": {"method": "draft_model"}}, "needs drafter.model"),
    ({"verifier": {"group_size": 100}}, "verifier.group_size must be 'auto', -1"),
    ({"runtime": {"cuda_graphs": "yes"}}, "runtime.cuda_graphs must be true or false or null"),
    ({"drafter": 5}, "drafter must be a mapping"),
    ({"server": {"port": 70000}}, "server.port must be an integer in [0, 65535], got 70000"),
    ({"server": {"api_key": ""}}, "server.api_key must be a non-empty string or null"),
    ({"server": {"max_waiting": 0}}, "server.max_waiting must be an integer >= 1"),
])
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        qc.from_dict(data)
    assert needle in str(e.value)


@pytest.mark.parametrize("data,path,close", [
    ({"drafter": {"num_token": 5}}, "'num_token' in drafter", "drafter.num_tokens"),
    ({"verifer": {}}, "'verifer' at the top level", "verifier"),
    ({"sampling": {"temprature": 0.5}}, "'temprature' in sampling", "sampling.temperature"),
    ({"drafter": {"ngram": {"maximum": 3}}}, "'maximum' in drafter.ngram", "drafter.ngram.max"),
    ({"server": {"max_wating": 3}}, "'max_wating' in server", "server.max_waiting"),
])
def test_unknown_keys_list_valid_keys_and_closest(data, path, close):
    with pytest.raises(ConfigError) as e:
        qc.from_dict(data)
    msg = str(e.value)
    assert f"unknown key {path}" in msg and "valid keys:" in msg and f"did you mean {close}" in msg


def test_yaml_file_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("drafter:\n  num_tokens: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        qc.load(f)
    with pytest.raises(ConfigError, match="does not exist"):
        qc.load(tmp_path / "missing.yaml")
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        qc.load(f)


def test_override_applies_dotted_keys_and_validates():
    c = qc.override(qc.DeployConfig(), {"drafter.method": "ngram", "drafter.num_tokens": 3, "model": None})
    assert c.drafter.method == "ngram" and c.drafter.num_tokens == 3 and c.model == "smollm2-135m-instruct"
    with pytest.raises(ConfigError, match="drafter.num_tokens"):
        qc.override(c, {"drafter.num_tokens": -1})


def test_every_shipped_config_validates():
    from pathlib import Path
    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    for f in files:
        qc.load(f)
