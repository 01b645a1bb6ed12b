"""torch_npu is imported by the NPU backend only, lazily: importing Quasar (the package, the backend
registry, the CLI, the engine) and using the CPU backend must never import it. Installing torch_npu
next to a CPU or CUDA torch breaks `import torch`, so an eager import anywhere would break every
non-Ascend user that happens to have it installed.

Each check runs in a fresh interpreter; the second one puts a booby-trapped `torch_npu` first on
sys.path (importing it raises), so touching it at all fails the test. The interpreters run with
TORCH_DEVICE_BACKEND_AUTOLOAD=0: on an Ascend host, torch >= 2.5 itself imports an installed
torch_npu at `import torch` (its device-extension autoload entry point), which is torch's doing,
not Quasar's, and would otherwise mask what this test checks there."""
import os
import subprocess
import sys
import textwrap

import pytest

IMPORTS = textwrap.dedent("""
    import sys
    import quasar, quasar.backends, quasar.run, quasar.engine
    import quasar.config, quasar.model.loader, quasar.spec_decode.scheduler, quasar.ops.reference
    from quasar import backends
    backends.available()
    assert backends.resolve_device("auto") in ("cpu", "cuda")
    backends.get("cpu")
    quasar.run.parse_args(["--device", "npu"])
    leaked = sorted(m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu."))
    assert not leaked, leaked
""")


def _run(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    if extra_path:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_quasar_does_not_import_torch_npu():
    r = _run(IMPORTS + "print('ok')")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


@pytest.fixture
def trapped(tmp_path):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("booby-trapped torch_npu was imported")\n')
    return str(tmp_path)


def test_a_booby_trapped_torch_npu_is_never_touched(trapped):
    r = _run(IMPORTS + "print('ok')", extra_path=trapped)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    assert "booby-trapped" not in r.stderr


def test_only_the_npu_backend_imports_it(trapped):
    """...and asking for the npu backend is where it happens: the failure becomes a clean
    UnsupportedError naming the cause and what to install."""
    code = textwrap.dedent("""
        from quasar import backends
        from quasar.errors import UnsupportedError
        try:
            backends.get("npu")
        except UnsupportedError as e:
            print("UNSUPPORTED:", e)
    """)
    r = _run(code, extra_path=trapped)
    assert r.returncode == 0, r.stderr
    assert "UNSUPPORTED:" in r.stdout and "booby-trapped torch_npu was imported" in r.stdout, r.stdout
    assert "torch-npu==" in r.stdout and "CANN" in r.stdout
