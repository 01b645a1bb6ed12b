"""Every Triton kernel compiles for sm_90 (through ptxas to a cubin) with the installed Triton,
with the constexprs the backend's own launches use. The interpreter tests check what the kernels
compute; this catches what only the compiler rejects. Runs in a subprocess: it swaps Triton's
driver for a stand-in that reports a CUDA target."""
import os
import subprocess
import sys
from pathlib import Path


def test_all_kernels_compile_for_sm90():
    script = Path(__file__).with_name("triton_compile.py")
    # the shipped kernel options (L2 prefetch on): triton_compile.py passes its own KernelConfig, and
    # no QUASAR_* override is handed to the subprocess
    env = {k: v for k, v in os.environ.items() if k != "QUASAR_PREFETCH"}
    r = subprocess.run([sys.executable, str(script), "--arch", "90"], capture_output=True, text=True, timeout=900,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if "kernel variants compiled" in x)
    for kernel in ("_int8_weight_kernel", "_int4_kernel", "_attn_kernel", "_quant_kernel", "_rms_norm_kernel",
                   "_silu_mul_kernel", "_quant_chunks_kernel", "_rope_kv_kernel"):
        assert kernel in line, line
    pf = next(x for x in r.stdout.splitlines() if x.startswith("L2 prefetch emitted by:"))
    for kernel in ("_int8_weight_kernel", "_int4_kernel"):
        assert kernel in pf, pf
