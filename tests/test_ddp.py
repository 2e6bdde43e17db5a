"""A 2-process CPU DDP validation (gloo) writes the same predictions and miATE as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import free_port, tiny_config

pytestmark = pytest.mark.slow  # spawns processes


def _validate(config, run, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "memefx.cli", "validate", "--config", str(config),
           "--trainer.default_root_dir", str(run), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_two_processes_equal_one(tmp_path, tiny_root):
    # an odd number of validation memes: a padding sampler would score one of them twice
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    lines = (root / "dev_seen.jsonl").read_text().splitlines()
    (root / "dev_seen.jsonl").write_text("\n".join(lines[: len(lines) - 1 + len(lines) % 2]) + "\n")
    kept = {json.loads(line)["id"] for line in (root / "dev_seen.jsonl").read_text().splitlines()}
    conf = pd.read_parquet(root / "confounders.parquet")
    conf[(conf.split != "dev_seen") | conf.id.isin(kept)].to_parquet(root / "confounders.parquet", index=False)
    assert len(kept) % 2 == 1
    config = tiny_config(tmp_path, root, midas=True)
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
    # AUROC/accuracy see every sample once (no sampler padding): the same numbers as one process
    metrics_a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    metrics_b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert {"val/auroc", "val/acc"} <= set(metrics_a) and set(metrics_a) == set(metrics_b)
    for key, value in metrics_a.items():
        assert metrics_b[key] == pytest.approx(value, abs=1e-6), key
    keys = ["id", "layer", "head", "block", "score"]
    name = "val_ckpt_epochinit.parquet"  # validate without a checkpoint: untrained weights, no epoch
    ta = pd.read_parquet(tmp_path / "one" / "midas" / name).sort_values(keys, ignore_index=True)
    tb = pd.read_parquet(tmp_path / "two" / "midas" / name).sort_values(keys, ignore_index=True)
    assert len(ta) == len(tb) and ta.id.nunique() == len(a)
    pd.testing.assert_frame_equal(ta, tb, atol=1e-6, rtol=1e-5)
