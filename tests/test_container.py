"""Dockerfile and Apptainer definition install exactly what `make` installs (no engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_steps() -> tuple[str, str]:
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH\s*:=\s*(.+)$", makefile, re.M).group(1).strip()
    assert "pip install -c constraints.txt $(TORCH)" in makefile
    extras = re.search(r"pip install -c constraints.txt -e '(\.\[[^]]+\])'", makefile).group(1)
    return torch_pin, extras


def test_dockerfile_install_steps_match_makefile():
    torch_pin, extras = _make_steps()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"pip install -c constraints.txt {torch_pin}" in dockerfile
    assert f"pip install -c constraints.txt -e '{extras}'" in dockerfile
    assert "scripts/check_install.py" in dockerfile
    assert re.search(r'^ENTRYPOINT \["memefx"\]', dockerfile, re.M)
    for copied in re.findall(r"^COPY (.+) \./$", dockerfile, re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name


def test_apptainer_definition_matches_dockerfile_and_makefile():
    torch_pin, extras = _make_steps()
    definition = (ROOT / "apptainer" / "memefx.def").read_text()
    base = re.search(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert f"From: {base}" in definition
    assert f"pip install --no-cache-dir -c constraints.txt {torch_pin}" in definition
    assert f"pip install --no-cache-dir -c constraints.txt -e '{extras}'" in definition
    for line in re.findall(r"^\s{4}(\S+) /opt/memefx/", definition, re.M):
        assert (ROOT / line).exists(), line


def test_constraints_pin_the_torch_the_makefile_installs():
    torch_pin, _ = _make_steps()
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for req in torch_pin.split():
        name, version = req.split("==")
        assert pins[name] == version
