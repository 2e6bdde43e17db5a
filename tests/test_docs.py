"""The user documentation points at files that exist and at nothing a user's clone lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "method.md"]
PATH = re.compile(r"`((?:memefx|benchmarks|configs|scripts|tests|docs|apptainer)/[\w./-]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_project_file_exists(doc):
    text = doc.read_text()
    named = set(PATH.findall(text))
    named |= {f"memefx/icl/{n}" for n in re.findall(r"`(metagrad_\w+\.py)`", text)}
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
    if doc.name == "method.md":
        assert {"memefx/causal/miate.py", "memefx/attribution/masks.py", "memefx/attribution/midas.py",
                "memefx/attribution/integrated.py", "memefx/icl/prompts.py", "memefx/icl/metrics.py",
                "memefx/icl/metagrad.py"} <= named


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_pointer_outside_the_project(doc):
    text = doc.read_text()
    for pattern in (r"\.\./shared", r"\bSPEC\.md\b", r"\bDESIGN\.md\b", r"\bthe open [\w -]*issue\b"):
        hits = [ln for ln in text.splitlines() if re.search(pattern, ln)]
        assert not hits, f"{doc.name} points users at what their clone lacks ({pattern}): {hits[:3]}"


def test_readme_links_the_method_page():
    assert "(docs/method.md)" in (ROOT / "README.md").read_text()
