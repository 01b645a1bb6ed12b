"""The structure the next capabilities build on (issue 16): the scheme registry is the only list
of scheme names, a scheme plugs in from its own file plus one registration, the runtime does not
import the benchmark harness, and nothing outside the backends branches on the device type."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quasar import quant

ROOT = Path(__file__).resolve().parent.parent
ENGINE = [p for d in ("quasar", "backends", "ops", "tools") for p in (ROOT / d).rglob("*.py")]


def _string_constants(path: Path):
    """(line, value) of every string constant that is not a docstring."""
    tree = ast.parse(path.read_text(), str(path))
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_scheme_name_is_written_outside_the_scheme_modules():
    """A scheme's name as a string constant in code outside quasar/quant/ is a second list of
    schemes that can drift from the registry (prose in messages and docstrings aside; the old
    alias `bf16` is also the dtype's abbreviation and a kernel table's name, so it is not counted)."""
    names = set(quant.names())
    hits = []
    for path in ENGINE:
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("quasar", "quant"):
            continue
        for line, value in _string_constants(path):
            if value in names:
                hits.append(f"{rel}:{line}: {value!r}")
    assert not hits, "scheme names outside quasar/quant/:\n" + "\n".join(hits)


def test_the_yaml_examples_only_name_registered_schemes():
    import yaml
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        for section, key in (("verifier", "quant"), ("verifier", "lm_head_quant"), ("drafter", "scheme")):
            v = (cfg.get(section) or {}).get(key)
            if v is not None:
                assert quant.canonical(v) in quant.SCHEMES, (f.name, section, key, v)


def test_importing_the_runtime_does_not_import_the_benchmarks():
    code = ("import sys, quasar.run, quasar.engine, quasar.fidelity; "
            "bad = [m for m in sys.modules if m == 'quasar.bench' or m.startswith('quasar.bench.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def _device_branches(path: Path):
    """Comparisons against a device type: `x.type == "cuda"`, `device == "npu"`, `.is_cuda`, ..."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("is_cuda", "is_npu"):
            yield node.lineno
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            consts = {p.value for p in parts if isinstance(p, ast.Constant)}
            consts |= {e.value for p in parts if isinstance(p, (ast.Tuple, ast.List, ast.Set))
                       for e in p.elts if isinstance(e, ast.Constant)}
            if consts & {"cuda", "npu", "cpu"}:
                yield node.lineno
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "is_available" \
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr in ("cuda", "npu"):
            yield node.lineno


def test_nothing_in_the_engine_branches_on_the_device_type():
    """Device branches belong to backends/ (and the kernels in ops/); the benchmark harness times
    devices and may ask which one it has. The rest of quasar/ must be device-agnostic."""
    hits = []
    for path in (ROOT / "quasar").rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("quasar", "bench"):
            continue
        hits += [f"{rel}:{line}" for line in _device_branches(path)]
    assert not hits, "device branches outside backends/ and ops/:\n" + "\n".join(hits)


# ---------------------------------------------------------------- a scheme plugs in from one file

class ToyW8A16Rows(quant.Scheme):
    """A toy w8a16 whose scales are stored per *input* row group instead of per output channel:
    y = x @ (codes * col_scale[None, :]).T. Defined here alone, registered with one line."""
    name = "toy-w8a16-colscale"
    weights = "int8, one fp32 scale per input feature"
    activations = "model dtype"
    weight_bits = 8

    @classmethod
    def quantize(cls, w, qcfg):
        from quasar.quant.format import QuantizedWeight
        col = (w.float().abs().amax(dim=0) / 127).clamp(min=1e-10)             # [K]
        codes = torch.round(w.float() / col).clamp(-127, 127).to(torch.int8)
        qw = QuantizedWeight(codes, col.view(1, -1), bits=8, group_size=1)
        return qw

    @classmethod
    def accepts(cls, w):
        from quasar.quant.format import QuantizedWeight
        return isinstance(w, QuantizedWeight) and w.bits == 8 and w.group_size == 1

    @classmethod
    def reference_gemm(cls, x, w, bias=None):
        dense = w.codes.float() * w.scale.view(1, -1)
        y = x.float() @ dense.T
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    kernels = {"cpu": (quant.ReferenceKernel,)}


@pytest.fixture
def toy_scheme():
    quant.register(ToyW8A16Rows)
    try:
        yield ToyW8A16Rows
    finally:
        quant.unregister(ToyW8A16Rows.name)


def test_a_toy_scheme_registered_from_a_test_runs_end_to_end(toy_scheme, tiny_root):
    """The config accepts it, the CPU backend runs it, a model loads with it and generates, and a
    backend without a kernel for it says so by name."""
    from tiny import make_tiny

    from quasar import backends
    from quasar.config import DeployConfig, from_dict
    from quasar.errors import ConfigError, UnsupportedError
    cfg = from_dict({"verifier": {"quant": toy_scheme.name}})
    assert cfg.verifier.quant == toy_scheme.name
    assert toy_scheme.name in backends.get("cpu").schemes
    assert toy_scheme.name in quant.table()
    w = torch.randn(24, 32)
    qw = toy_scheme.quantize(w, cfg.verifier)
    layer = toy_scheme.layer(backends.get("cpu"), qw, None, torch.float32)
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ w.T, rtol=0.05, atol=0.05 * w.abs().max().item())
    assert torch.equal(layer(x), toy_scheme.reference_gemm(x, qw))
    from quasar.backends.cuda import make_backend
    with pytest.raises(UnsupportedError, match=toy_scheme.name):
        make_backend(interpret=True).check_scheme(toy_scheme.name)
    # a whole model on the toy scheme, from its config through the loader, the runner and the
    # scheduler: greedy decoding
    from quasar.engine import ModelRunner
    from quasar.model.loader import build_model
    from quasar.spec_decode.drafter import Drafter
    from quasar.spec_decode.ngram import NgramDrafter
    from quasar.spec_decode.sampling import SamplingParams
    from quasar.spec_decode.scheduler import Scheduler
    path = make_tiny(tiny_root, "llama")
    cpu = backends.get("cpu")
    model = build_model(path, cpu, torch.float32, 64, cfg.verifier)
    assert model.layers[0].mlp.down_proj.scheme is toy_scheme and model.scheme == toy_scheme.name
    prompt = [1, 5, 9, 13, 1, 5, 9, 13, 1, 5]
    ar, st = Scheduler(ModelRunner(model), Drafter(), SamplingParams(), 0, set()).generate(prompt, 8)
    spec, st2 = Scheduler(ModelRunner(model), NgramDrafter("cpu", 1, 3), SamplingParams(), 4, set()).generate(prompt, 8)
    assert len(ar) == 8 and spec == ar          # lossless speculation on the toy scheme too
    ref = build_model(path, cpu, torch.float32, 64, DeployConfig().verifier)
    want, _ = Scheduler(ModelRunner(ref), Drafter(), SamplingParams(), 0, set()).generate(prompt, 8)
    assert ar[:2] == want[:2]                   # an 8-bit model tracks the float one
    quant.unregister(toy_scheme.name)
    with pytest.raises(ConfigError, match="toy-w8a16-colscale"):
        from_dict({"verifier": {"quant": toy_scheme.name}})


def test_the_readme_scheme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    a = readme.index("<!-- scheme table (quasar.quant.table) -->") + len("<!-- scheme table (quasar.quant.table) -->")
    b = readme.index("<!-- end scheme table -->")
    assert readme[a:b].strip() == quant.table(), "regenerate the README table with quasar.quant.table()"


def test_every_contract_op_is_a_backend_method_and_each_backend_says_what_it_lacks():
    from quasar.backends import CONTRACT_METHODS, Backend, DEVICES, backend_class, implementing
    from quasar.errors import UnsupportedError
    from quasar.ops import OPS
    assert set(CONTRACT_METHODS) == set(OPS) - {"gemm"}
    for op in CONTRACT_METHODS:
        assert callable(getattr(Backend, op)), op
        assert implementing(op) == list(DEVICES), op
    class Partial(backend_class("cpu")):
        name = "partial"
        attention = Backend.attention                     # a backend without attention
    be = Partial(torch.device("cpu"))
    with pytest.raises(UnsupportedError, match="op 'attention' is not implemented by the partial backend; "
                                               "backends that implement it: cpu, cuda, npu"):
        be.attention(None, None, 0, None, 0)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("backends", "ops"):
        parts = ["quasar"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every quasar module this file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("quasar")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("quasar"):
                out.add(base)
                out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_setup_flows_one_way_no_import_cycles():
    """No two modules of the engine import each other, directly or around a loop, not even inside
    a function (the benchmark harness and the tools sit on top and are not counted)."""
    files = [p for p in ENGINE if p.relative_to(ROOT).parts[0] != "tools"
             and p.relative_to(ROOT).parts[:2] != ("quasar", "bench") and "triton/_" not in str(p)]
    mods = {_module_name(p): p for p in files}

    def owner(m):      # a.b.c -> the longest known module prefix (a symbol import names its module)
        while m and m not in mods:
            m = m.rpartition(".")[0]
        return m
    graph = {m: {owner(i) for i in _imports(p, m)} - {"", m, "quasar"} for m, p in mods.items()}
    for m in graph:       # a package's __init__ importing its own submodules is not a cycle
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") and mods[m].name == "__init__.py")}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue                  # a module and its own package
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_bf16_is_kept_as_the_old_name_of_unquantized():
    from quasar.config import from_dict
    cfg = from_dict({"verifier": {"quant": "bf16", "lm_head_quant": "bf16"}})
    assert cfg.verifier.quant == cfg.verifier.lm_head_quant == quant.default() == "unquantized"
    assert quant.get("bf16") is quant.SCHEMES["unquantized"]
