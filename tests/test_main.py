"""`python -m memefx` is the `memefx` command (for environments without the console script on PATH)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

import pytest


def test_module_runs_the_cli_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["memefx", "synth", "--out", str(tmp_path / "s"), "--seed", "2",
                                      "--n-memes", "40", "--image-size", "16"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("memefx", run_name="__main__")
    assert exit_info.value.code == 0
    assert sum(s["memes"] for s in json.loads(capsys.readouterr().out)["splits"].values()) == 40
    assert (tmp_path / "s" / "train.jsonl").is_file()


def test_module_exit_code_is_the_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memefx", "report", "--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("memefx", run_name="__main__")
    assert exit_info.value.code not in (0, None)  # neither folder is a run


@pytest.mark.slow  # spawns a process
def test_python_dash_m_memefx_in_a_fresh_interpreter(tmp_path):
    done = subprocess.run([sys.executable, "-m", "memefx", "fit", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--trainer" in done.stdout and "--model" in done.stdout
