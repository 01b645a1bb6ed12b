"""Kernel options (runtime.kernels) are config: validated like every key, passed to the backend at
construction and from it to every launch; the QUASAR_* environment variables override them in one
place (KernelConfig.with_env). No module global carries an option."""
import json

import pytest

from quasar import backends
from quasar.config import KernelConfig, from_dict
from quasar.errors import ConfigError


def test_kernel_options_are_validated_like_every_key(tmp_path):
    cfg = from_dict({"runtime": {"kernels": {"pdl": "off", "prefetch": 0, "early_loads": False}}})
    assert cfg.runtime.kernels == KernelConfig(pdl="off", prefetch=0, early_loads=False)
    with pytest.raises(ConfigError, match="runtime.kernels.pdl must be one of 'auto', 'on', 'off'"):
        from_dict({"runtime": {"kernels": {"pdl": "maybe"}}})
    with pytest.raises(ConfigError, match="unknown key 'prefech'.*prefetch"):
        from_dict({"runtime": {"kernels": {"prefech": 1}}})
    with pytest.raises(ConfigError, match="tuning file .* does not exist"):
        from_dict({"runtime": {"kernels": {"tuning": str(tmp_path / "nope.json")}}})


def test_environment_overrides_are_read_in_one_place():
    k = KernelConfig()
    assert k.with_env({}) is k
    got = k.with_env({"QUASAR_PDL": "force", "QUASAR_PREFETCH": "0", "QUASAR_EARLY": "off",
                      "QUASAR_PTX_DEQUANT": "0", "QUASAR_TRITON_TUNING": "none"})
    assert got == KernelConfig(pdl="on", prefetch=0, early_loads=False, ptx_dequant=False, tuning="none")
    assert k.with_env({"QUASAR_PREFETCH": "2"}).prefetch == 2


def test_the_backend_carries_its_options_and_each_set_of_options_gets_its_own(monkeypatch):
    monkeypatch.delenv("QUASAR_PDL", raising=False)
    a = backends.get("cpu", KernelConfig(pdl="off"))
    b = backends.get("cpu", KernelConfig())
    assert a.options.pdl == "off" and b.options.pdl == "auto" and a is not b
    assert backends.get("cpu", KernelConfig(pdl="off")) is a


def test_the_tuning_option_selects_the_launch_table(tmp_path):
    """tuning: a JSON file of python -m quasar.bench.ops is used by the CUDA backend's kernels;
    none turns tables off (CPU machine: the interpreter backend, whose kernels take the same path)."""
    from quasar.backends.cuda import make_backend
    f = tmp_path / "table.json"
    f.write_text(json.dumps({"tuned": [{"kind": "int4_a16", "m_bucket": 8, "n": 512, "k": 1024,
                                        "config": {"bn": 32, "split_k": 2, "bk": 256, "num_warps": 4,
                                                   "num_stages": 2}}]}))
    with_table = make_backend(interpret=True, options=KernelConfig(tuning=str(f)))
    without = make_backend(interpret=True, options=KernelConfig(tuning="none"))
    tuning = with_table.triton.tuning           # the interpreter's copy of the kernel package
    assert with_table.tuned("int4_a16", 6, 512, 1024) == tuning.GemmConfig(32, 2, 256, 4, 2)
    assert without.tuned("int4_a16", 6, 512, 1024) is None
    assert tuning.pick("int4_a16", 6, 512, 1024, "cpu", opts=with_table.options).split_k == 2


def test_options_reach_the_launch():
    """The PDL decision of every launch comes from the options it is given."""
    from quasar.ops.triton import kernels
    common = kernels(True)._common
    assert common.pdl_kw("cpu", KernelConfig(pdl="on")) == {"PDL": False}      # the interpreter: never
    assert common.prefetch(KernelConfig(prefetch=0)) == 0 and common.prefetch(KernelConfig()) == 1
    assert not common.ptx_dequant(KernelConfig())                              # interpreter: Triton's lowering
    assert not common.early_loads("attention", KernelConfig(early_loads=False))
    assert common.early_loads("attention", KernelConfig())
