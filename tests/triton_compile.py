"""Compile every Triton kernel of the CUDA backend for a GPU target without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but it accepts programs the
compiler rejects (e.g. an int8 tl.dot without out_dtype=tl.int32 under triton 3.6). This script
installs a stand-in driver that reports a CUDA target (sm_90 by default), makes every launch a
warm-up (compile, never run), and calls the backend's own wrappers with CPU tensors over the
shapes, dtypes and schemes the engine uses, so each kernel is compiled with exactly the
constexprs a real launch would use, through ptxas to a cubin.

    python tests/triton_compile.py [--arch 90]      # prints one line per kernel variant
"""
from __future__ import annotations

import argparse
import os

os.environ["TRITON_INTERPRET"] = "0"


def install_fake_driver(arch: int = 90):
    import torch
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as drv

    class FakeCudaDriver:
        target = GPUTarget("cuda", arch, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

        def map_python_to_cpp_type(self, ty):
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

    drv.set_active(FakeCudaDriver())
    compiled = []
    orig = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        k = orig(self, *args, grid=grid, warmup=True, **kwargs)
        assert "cubin" in k.asm, f"{self.fn.__name__}: no cubin"
        compiled.append((self.fn.__name__, k))
        return k

    jit.JITFunction.run = run
    return compiled


def compile_all(arch: int = 90, verbose: bool = False, part: str = "all") -> list[str]:
    """part: "norms" (quantization / norm / SiLU kernels), "rest" (GEMMs, RoPE, attention) or
    "all" (what the test compiles)."""
    compiled = install_fake_driver(arch)
    import torch

    from quasar.config import KernelConfig
    from quasar.kv import KVCache
    from quasar.ops.triton import kernels
    from quasar.quant import rtn
    # sm_90: kernels launch with programmatic dependent launch (pdl on without asking the device);
    # the other options at their shipped defaults (L2 prefetch on, early loads on, PTX dequant on)
    o = KernelConfig(pdl="on")
    kn = kernels(False)
    nq, g8, g4, attn = kn.norm_quant, kn.gemm_int8, kn.gemm_int4, kn.attention
    done: list[str] = []

    def note(what):
        done.append(what)
        if verbose:
            print("ok", what, flush=True)

    for dt in ((torch.bfloat16, torch.float32) if part in ("all", "norms") else ()):
        for m in (1, 33):
            x = torch.randn(m, 256, dtype=dt)
            w = torch.ones(256, dtype=dt)
            for qt in ("int8", "int4", "fp8"):
                nq.quantize_per_token(x, qt, opts=o)
                nq.rms_norm_quant(x, w, 1e-6, qt, opts=o)
                nq.silu_mul_quant(torch.randn(m, 512, dtype=dt), qt, opts=o)
            nq.rms_norm(x, w, 1e-6, opts=o)
            for qt in (None, "int8", "int4", "fp8"):
                nq.add_rms_norm(x, x, w, 1e-6, qt, opts=o)
            # rows longer than one block: the multi-pass paths
            xl, wl = torch.randn(m, 8192, dtype=dt), torch.ones(8192, dtype=dt)
            for qt in (None, "int8", "fp8"):
                nq.add_rms_norm(xl, xl, wl, 1e-6, qt, opts=o)
                nq._silu(torch.randn(m, 2 * 20000, dtype=dt), qt, opts=o)
            nq.rms_norm(xl, wl, 1e-6, opts=o)
            nq.silu_mul(torch.randn(m, 512, dtype=dt), opts=o)
        note(f"norm/quant kernels {dt}")
    k, n = 512, 384
    wf = torch.randn(n, k)
    p8 = g8.pack_int8(rtn.int8_per_channel(wf))
    p4 = {(gs, sym): g4.pack_int4(rtn.int4(wf, gs, symmetric=sym))
          for gs, sym in ((128, True), (32, False), (-1, True))}
    # BM 16 only (M <= 16: decode and verify chunks). BM 32/64 are the same code with larger dot
    # tiles; from a cold Triton cache their int4 variants alone took > 5 minutes of ptxas on
    # CI's 2 cores, and the interpreter tests run those paths for their values.
    for m in ((1,) if part in ("all", "rest") else ()):
        a8 = nq.quantize_per_token(torch.randn(m, k), "int8", opts=o)
        a4 = nq.quantize_per_token(torch.randn(m, k), "int4", opts=o)
        g8.gemm_w8a8_int8(a8, p8, opts=o)
        g8.gemm_w8a8_int8(a8, p8, bias=torch.randn(n), opts=o)
        g4.gemm_w4a4(a4, p4[(-1, True)], opts=o)
        if arch >= 89:         # fp8 x fp8 tensor-core dot
            from quasar.ops import reference as R
            pf = g8.pack_fp8(rtn.fp8_per_channel(wf))
            for dt in (torch.bfloat16, torch.float32):
                g8.gemm_w8a8_fp8(R.quantize_per_token(torch.randn(m, k, dtype=dt), "fp8"), pf, bias=torch.randn(n), opts=o)
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k, dtype=dt)
            g8.gemm_w8a16(x, p8, opts=o)
            g8.gemm_dense_stream(x, torch.randn(n, k, dtype=dt), opts=o)
            for key, p in p4.items():
                g4.gemm_w4a16(x, p, opts=o)
        note(f"GEMMs M={m}")
    for dt in ((torch.bfloat16, torch.float32) if part in ("all", "rest") else ()):
        cache = KVCache(2, 1, 8, 256, 128, dt, "cpu")
        cos = torch.randn(256, 128)
        for t in (1, 6):
            qkv = torch.randn(1, t, (32 + 16) * 128, dtype=dt)
            pos = torch.arange(100, 100 + t).view(1, -1)
            w = torch.ones(128, dtype=dt)
            kn.rope.rope_kv_write(qkv, w, w, 1e-6, cos, cos, pos, cache, 1, opts=o)
            kn.rope.rope_kv_write(qkv, None, None, 1e-6, cos, cos, pos, cache, 0, opts=o)
        note(f"rope_kv_write {dt}")
    for dt in ((torch.bfloat16,) if part in ("all", "rest") else ()):
        cache = KVCache(1, 1, 2, 8192, 64, dt, "cpu")
        for t in (1, 6):
            q = torch.randn(1, t, 8, 64, dtype=dt)
            pos = torch.arange(4000, 4000 + t).view(1, -1)
            attn.attention(q, cache, 0, pos, 8192, opts=o)          # long: split + combine
            attn.attention(q, cache, 0, pos - 3900, 100 + t, torch.ones(1, t, 100 + t, dtype=torch.bool), opts=o)
        note(f"attention {dt}")
    for dt in ((torch.bfloat16,) if part in ("all", "rest") else ()):
        # the paged cache: a chain (verify, T = 6) and draft trees (HAS_TREE): 6 nodes (one program
        # per kv head) and 64 nodes x G 4 (rows tiled), each with one split and with the combine
        from quasar.engine.context import StepContext
        from quasar.kv.paged import PagedKVCache
        from quasar.spec_decode import tree as T
        pc = PagedKVCache(1, 40, 16, 2, 64, dt, "cpu")
        tab = list(range(1, 40))
        slot = lambda p: tab[p // 16] * 16 + p % 16          # noqa: E731
        s0 = 300
        for t, tree in ((6, False), (6, True), (64, True)):
            if tree:
                r = T.rows(s0, [-1] + [m // 2 for m in range(1, t)], t)
                ctx = StepContext.make(r.positions, [slot(p) for p in r.storage], [0, t], [tab], [s0 + t], t, "cpu",
                                       0, r.storage, r.mask)
            else:
                ctx = StepContext.build([tab], [(s0, t)], 16, "cpu")
            q = torch.randn(t, 8, 64, dtype=dt)
            assert attn.supports_paged(q, pc, ctx)
            for ns in (1, 4):
                attn.paged_attention(q, pc, 0, ctx, num_splits=ns, opts=o)
        note(f"paged attention (chain, trees) {dt}")
    names = sorted({c[0] for c in compiled})
    # the GEMMs' L2 prefetch before the PDL wait is PTX the interpreter never runs: it must be emitted
    pf = sorted({name for name, k in compiled if "prefetch.global.L2" in k.asm.get("ptx", "")})
    return [f"{len(compiled)} kernel variants compiled for sm_{arch}: {', '.join(names)}",
            f"L2 prefetch emitted by: {', '.join(pf) or 'none'}"] + done


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--part", choices=("all", "norms", "rest"), default="all")
    a = ap.parse_args()
    import triton
    print(f"triton {triton.__version__}")
    for line in compile_all(a.arch, verbose=True, part=a.part):
        print(line)
