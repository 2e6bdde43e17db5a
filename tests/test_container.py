"""The Dockerfile installs exactly what `make` installs (no Docker engine runs here to build it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_install_steps_match_makefile():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    torch_pin = re.search(r"^TORCH\s*:=\s*(.+)$", makefile, re.M).group(1).strip()
    extras = re.search(r"pip install -e '(\.\[[^]]+\])'", makefile).group(1)
    assert f"pip install {torch_pin}" in dockerfile
    assert f"pip install -e '{extras}'" in dockerfile
    assert "scripts/check_install.py" in dockerfile
    assert re.search(r'^ENTRYPOINT \["memefx"\]', dockerfile, re.M)
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied
