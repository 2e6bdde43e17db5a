"""A 2-process CPU DDP validation (gloo) writes the same predictions and miATE as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.test_cli import _tiny_config


def _validate(config, run, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "memefx.cli", "validate", "--config", str(config),
           "--trainer.default_root_dir", str(run), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_two_processes_equal_one(tmp_path, tiny_root):
    config = _tiny_config(tmp_path, tiny_root, midas=True)
    _validate(config, tmp_path / "one")
    _validate(config, tmp_path / "two", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    for split in ["dev_seen"]:
        a = pd.read_parquet(tmp_path / "one" / "predictions" / f"{split}.parquet")
        b = pd.read_parquet(tmp_path / "two" / "predictions" / f"{split}.parquet")
        pd.testing.assert_frame_equal(a, b, atol=1e-6, rtol=0)
        ma = json.loads((tmp_path / "one" / "miate" / f"{split}.json").read_text())
        mb = json.loads((tmp_path / "two" / "miate" / f"{split}.json").read_text())
        for kind in ("shared_image", "shared_text"):
            assert ma[kind]["n_strata"] == mb[kind]["n_strata"] > 0
            for key in ("mean", "weighted_mean", "ci_low", "ci_high"):
                assert mb[kind][key] == pytest.approx(ma[kind][key], abs=1e-6)
    keys = ["id", "layer", "head", "block", "score"]
    ta = pd.read_parquet(tmp_path / "one" / "midas" / "val_epoch0.parquet").sort_values(keys, ignore_index=True)
    tb = pd.read_parquet(tmp_path / "two" / "midas" / "val_epoch0.parquet").sort_values(keys, ignore_index=True)
    assert len(ta) == len(tb) and ta.id.nunique() == len(a)
    pd.testing.assert_frame_equal(ta, tb, atol=1e-6, rtol=1e-5)
