"""Dockerfile and Apptainer definition install exactly what `make install` installs, once, on a plain
Python base (no Docker engine runs here, so the images are not built: these checks read the files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAIN_PYTHON = re.compile(r"^python:(\d+)\.(\d+)(?:\.\d+)?(?:-slim)?(?:-[a-z]+)?$")


def make_install_lines(makefile: str) -> list[str]:
    """The pip/check lines of the Makefile's install recipe, as a plain shell inside an image runs them:
    ``$(BIN)/python`` becomes ``python`` and ``$(TORCH)`` its pinned value."""
    torch_pin = re.search(r"^TORCH\s*:=\s*(.+)$", makefile, re.M).group(1).strip()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    lines = [ln.strip() for ln in recipe.splitlines() if "pip install" in ln or "check_install" in ln]
    return [ln.replace("$(BIN)/python", "python").replace("$(TORCH)", torch_pin) for ln in lines]


def run_lines(text: str) -> list[str]:
    """Shell commands of a Dockerfile's RUN steps or an Apptainer %post section, one per entry."""
    if "%post" in text:
        body = re.search(r"^%post\n((?:[ \t]+.*\n|\n)+)", text, re.M).group(1)
    else:
        body = "\n".join(re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M)).replace("\\\n", "\n")
    parts = re.split(r"\n|&&", body)
    return [p.strip() for p in parts if p.strip()]


def base_image(text: str) -> str:
    match = re.search(r"^FROM (\S+)", text, re.M) or re.search(r"^From: (\S+)", text, re.M)
    return match.group(1)


DOCKERFILE = (ROOT / "Dockerfile").read_text()
DEFINITION = (ROOT / "apptainer" / "memefx.def").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def test_make_install_lines_are_found():
    lines = make_install_lines(MAKEFILE)
    assert lines == ["python -m pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1",
                     "python -m pip install -c constraints.txt -e '.[wandb,minilm,quant,dev,lightgbm]'",
                     "python scripts/check_install.py"]


@pytest.mark.parametrize("name,text", [("Dockerfile", DOCKERFILE), ("apptainer/memefx.def", DEFINITION)])
def test_image_runs_the_makefile_install_lines_in_order(name, text):
    wanted = make_install_lines(MAKEFILE)
    got = [ln for ln in run_lines(text) if "pip install" in ln or "check_install" in ln]
    assert got == wanted, f"{name}: install lines {got} differ from the Makefile's {wanted}"


@pytest.mark.parametrize("name,text", [("Dockerfile", DOCKERFILE), ("apptainer/memefx.def", DEFINITION)])
def test_plain_python_base_and_torch_installed_once(name, text):
    base = base_image(text)
    match = PLAIN_PYTHON.match(base)
    assert match, f"{name}: base image {base!r} is not a plain python:X.Y image (torch would come twice)"
    low = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert tuple(map(int, match.groups())) >= tuple(map(int, low.groups()))
    torch_lines = [ln for ln in run_lines(text) if re.search(r"\btorch==", ln)]
    assert len(torch_lines) == 1, f"{name}: torch is installed by {len(torch_lines)} lines: {torch_lines}"
    assert "make" in " ".join(ln for ln in run_lines(text) if "apt-get install" in ln)  # for `make run-here`


def test_docker_and_apptainer_share_base_files_and_entrypoint():
    assert base_image(DOCKERFILE) == base_image(DEFINITION)
    docker_files = {n for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M) for n in line.split()[:-1]}
    files = set(re.findall(r"^\s{4}(\S+) /opt/memefx/", DEFINITION, re.M))
    assert docker_files == files and "memefx" in files
    for name in files:
        assert (ROOT / name).exists(), name
    assert re.search(r'^ENTRYPOINT \["memefx"\]', DOCKERFILE, re.M)
    assert re.search(r'^\s+exec memefx "\$@"', DEFINITION, re.M)
    assert re.search(r"^run-here:", MAKEFILE, re.M)


def test_constraints_pin_the_torch_the_makefile_installs():
    torch_pin = re.search(r"^TORCH\s*:=\s*(.+)$", MAKEFILE, re.M).group(1).strip()
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for req in torch_pin.split():
        name, version = req.split("==")
        assert pins[name] == version
    check = (ROOT / "scripts" / "check_install.py").read_text()
    expected = re.search(r"^EXPECTED = \((.+)\)$", check, re.M).group(1)
    assert [v.strip(" '\"") for v in expected.split(",")] == [r.split("==")[1] for r in torch_pin.split()]


def test_run_lines_reads_both_formats():
    docker = "FROM x\nRUN a \\\n && b\nRUN c\n"
    assert run_lines(docker) == ["a", "b", "c"]
    definition = "%post\n    a && b\n    c\n\n%runscript\n    exec d\n"
    assert run_lines(definition) == ["a", "b", "c"]


def test_build_context_leaves_out_the_venv_and_runs():
    """An old Docker builder sends the whole context: the multi-GB .venv and run folders must not be in it,
    and nothing the Dockerfile copies may be excluded."""
    ignored = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "runs", ".cache", ".git"} <= ignored
    copied = {n for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M) for n in line.split()[:-1]}
    assert not copied & ignored


@pytest.mark.parametrize("name,text", [("Dockerfile", DOCKERFILE), ("apptainer/memefx.def", DEFINITION)])
def test_images_carry_the_commit_and_a_cache_folder(name, text):
    assert "MEMEFX_GIT_COMMIT" in text and "--build-arg MEMEFX_GIT_COMMIT=$(git rev-parse HEAD)" in text, name
    assert re.search(r"MEMEFX_CACHE=", text), f"{name}: MEMEFX_CACHE is not set"


def test_provenance_reads_the_commit_an_image_was_built_from(monkeypatch):
    import subprocess

    from memefx import provenance

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setenv("MEMEFX_GIT_COMMIT", "0123abc")
    assert provenance.git_commit() == "0123abc (image build argument)"
    monkeypatch.setenv("MEMEFX_GIT_COMMIT", "unknown")
    assert provenance.git_commit() is None
