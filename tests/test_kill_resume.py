"""A real process killed mid-epoch and resumed with `--ckpt_path last` ends like an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from lightning.pytorch.callbacks import Callback

from memefx.report.compare import compare_runs
from tests.conftest import tiny_config


class KillAtStep(Callback):
    """SIGKILL the process after the given optimizer step: no cleanup, no final checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _fit(config, run, *extra):
    cmd = [sys.executable, "-m", "memefx.cli", "fit", "--config", str(config), "--trainer.max_epochs", "2",
           "--trainer.limit_train_batches", "8", "--trainer.default_root_dir", str(run), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow  # spawns processes
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, tiny_root):
    config = tiny_config(tmp_path, tiny_root, midas=True, callbacks=["checkpoint_every_3_steps"])
    full = _fit(config, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "killed"
    killed = _fit(config, run, "--trainer.callbacks+=tests.test_kill_resume.KillAtStep", "--trainer.callbacks.step=5")
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "midas" / "train_epoch0.parquet").exists()
    resumed = _fit(config, run, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    info, results = compare_runs(tmp_path / "full", run, atol=0.0, rtol=0.0)
    assert results == [], results
