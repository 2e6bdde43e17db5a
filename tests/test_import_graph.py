"""The import graph of memefx/, read from the source (fast; no interpreter per package): no circle anywhere
(lazy imports inside functions included), and none of the never-arrows: the pure maths (causal/,
attribution/) imports no Lightning, models, data or icl; data imports no models; icl imports no models,
callbacks or report; the vocabulary (schema) imports nothing of memefx."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "memefx"
NEVER = {
    "memefx.causal": ("lightning", "pytorch_lightning", "memefx.models", "memefx.data", "memefx.icl", "memefx.callbacks"),
    "memefx.attribution": ("lightning", "pytorch_lightning", "memefx.models", "memefx.data", "memefx.icl",
                           "memefx.callbacks"),
    "memefx.data": ("memefx.models", "memefx.callbacks", "memefx.attribution", "memefx.icl"),
    "memefx.icl": ("memefx.models", "memefx.callbacks", "memefx.report"),
    "memefx.schema": ("memefx.",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module the file imports, at module level or inside a function (``from a import b`` counts as
    ``a`` and as ``a.b``, which is kept when it names a module). ``package``: the file's package, for
    relative imports (default: from its place under memefx/)."""
    if package is None:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: strip level - 1 trailing parts of the package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]] = GRAPH) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    cycles = _cycles()
    assert not cycles, f"import circles (module level or lazy): {cycles}"


@pytest.mark.parametrize("package", sorted(NEVER))
def test_never_arrows(package):
    bad = sorted({f"{name} -> {m}" for name, path in MODULES.items() if name == package or name.startswith(package + ".")
                  for m in imports(path) for banned in NEVER[package]
                  if m == banned or m.startswith(banned if banned.endswith(".") else banned + ".")})
    assert not bad, f"{package} imports what it must not: {bad}"


def test_the_reader_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import os\nfrom . import hmc\ndef f():\n    from memefx.data import tables\n"
                      "    import memefx.schema\n")
    assert {"os", "memefx.data.hmc", "memefx.data.tables", "memefx.schema"} <= imports(source, "memefx.data")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
