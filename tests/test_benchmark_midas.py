"""benchmarks/midas_overhead.py: the lockstep that pairs its steps, its ratios, and the script end to end."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "midas_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("midas_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_threads(lockstep, plan: dict[str, int], fail_at: dict[str, int] | None = None) -> list[tuple[str, int]]:
    """Each name takes ``plan[name]`` turns, as a fit's batch starts would; returns who ran when."""
    log: list[tuple[str, int]] = []

    def worker(name: str) -> None:
        try:
            for k in range(plan[name]):
                lockstep.take(name)
                if (fail_at or {}).get(name) == k:
                    raise RuntimeError("a fit that raises")
                log.append((name, k))
        except RuntimeError:
            pass
        finally:
            lockstep.leave(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "lockstep deadlocked"
    return log


def test_lockstep_runs_round_k_of_every_fit_back_to_back_in_rotated_order(bench):
    log = _run_threads(bench.Lockstep(["a", "b", "c"]), {"a": 3, "b": 3, "c": 3})
    assert log == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2)]


def test_lockstep_goes_on_without_a_fit_that_ended_or_raised(bench):
    log = _run_threads(bench.Lockstep(["a", "b", "c"]), {"a": 4, "b": 1, "c": 4}, fail_at={"c": 2})
    assert [k for n, k in log if n == "a"] == [0, 1, 2, 3]
    assert [k for n, k in log if n == "c"] == [0, 1]
    assert [k for n, k in log if n == "b"] == [0]


def test_paired_epoch_ratios_known_answer(bench):
    # train steps twice the base's, validation steps equal, no table writing: the ratio is closed form
    res = {"train": [2.0, 2.0, 4.0], "val": [1.0], "flush": 0.0}
    base = {"train": [1.0, 1.0, 2.0], "val": [1.0], "flush": 0.0}
    n_train, n_val = -(-8500 // 16), -(-500 // 16)
    expected = [(n_train * 2 + n_val) / (n_train + n_val)] * 2 + [(n_train * 4 + n_val) / (n_train * 2 + n_val)]
    assert bench.paired_epoch_ratios(res, base, 16) == pytest.approx(expected)
    # a 2-step window averages the steps it holds; table writing counts per sample of the fit
    windows = bench.paired_epoch_ratios(res, base, 16, window=2)
    assert windows == pytest.approx([expected[0], (n_train * 3 + n_val) / (n_train * 1.5 + n_val)])
    flushed = bench.paired_epoch_ratios({**res, "flush": 16 * 6 * 1e-3}, base, 16)[0]  # 6 batches of 16 in the fit
    assert flushed == pytest.approx((n_train * 2 + n_val + 1e-3 * 9000) / (n_train + n_val))


@pytest.mark.slow
def test_benchmark_prints_its_lines_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--lengths", "16", "--train-steps", "10",
                          "--val-steps", "2", "--ig-samples", "2", "--ig-steps", "4"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    number = r"\d+\.\d+"
    for key in ("midas_overhead_ratio", "midas_off_ratio", "midas_n10_ratio", "eager_over_sdpa", "train_step_ratio",
                "val_step_ratio", "peak_memory_ratio", "ig_over_single_ratio", "single_vs_ig_spearman"):
        assert re.search(rf"^{key}=({number}|nan)", out.stdout, re.M), (key, out.stdout)
    assert re.search(rf"^midas_overhead_ratio={number}  \(IQR {number}-{number}, .*n=10\)", out.stdout, re.M)
    assert out.stdout.strip().splitlines()[-1].startswith("midas_overhead_ratio=")  # the headline is last
    profile = subprocess.run([sys.executable, str(SCRIPT), "--profile", "--shape", "tiny", "--lengths", "16"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert profile.returncode == 0, profile.stderr[-2000:]
    assert re.search(r"^profile_midas: step_s=", profile.stdout, re.M)
