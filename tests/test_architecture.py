"""The shape of the code, checked by walking imports: numeric primitives never reach the kernels (one dispatcher
in `vlmkv.kernels` picks a backend), the policy base knows nothing of the wrappers built on it, and storage and
attention call the dispatcher, never a backend."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vlmkv"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, as absolute dotted names (relative imports resolved), at any depth."""
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_quant_imports_nothing_from_kernels():
    for f in (ROOT / "quant").glob("*.py"):
        bad = {m for m in _imports(f) if m.startswith("vlmkv.kernels") or m == "vlmkv.kernels"}
        assert not bad, (f.name, bad)
        assert not {m for m in _imports(f) if m.startswith("transformers")}, f.name


def test_policy_base_does_not_import_the_wrappers():
    assert not {m for m in _imports(ROOT / "policies" / "base.py") if "compose" in m}


def test_storage_and_attention_call_the_dispatcher_not_a_backend():
    for name in ("storage.py", "attention.py"):
        mods = _imports(ROOT / name)
        assert not {m for m in mods if m.startswith(("vlmkv.kernels.cpu", "vlmkv.kernels.triton_kv"))}, (name, mods)
    assert "transformers" not in {m.split(".")[0] for m in _imports(ROOT / "storage.py")}
