"""Import directions: the pure maths (causal/, attribution/) imports neither Lightning nor models nor data;
data never imports models; the vocabulary of segments and kinds is a leaf (memefx.schema)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import memefx

pytestmark = pytest.mark.slow  # a fresh interpreter per package (sys.modules of this one is polluted)

RULES = {
    "memefx.causal": ("lightning", "pytorch_lightning", "memefx.models", "memefx.data", "memefx.callbacks"),
    "memefx.attribution": ("lightning", "pytorch_lightning", "memefx.models", "memefx.data", "memefx.callbacks"),
    "memefx.data": ("memefx.models", "memefx.callbacks", "memefx.attribution"),
    "memefx.schema": ("memefx.", "torch", "lightning"),
}


def _modules(package: str) -> list[str]:
    mod = __import__(package, fromlist=["_"])
    if not hasattr(mod, "__path__"):
        return [package]
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)]


def _imported_by(modules: list[str]) -> list[str]:
    """sys.modules of a fresh interpreter after importing ``modules``."""
    code = f"import json, sys; [__import__(m) for m in {modules!r}]; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(memefx.__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_direction(package):
    modules = _modules(package)
    loaded = _imported_by(modules)
    bad = sorted(m for m in loaded for banned in RULES[package]
                 if (m == banned or m.startswith(banned if banned.endswith(".") else banned + "."))
                 and not m.startswith(package))
    assert not bad, f"{package} ({len(modules)} modules) imports {bad[:8]}"
