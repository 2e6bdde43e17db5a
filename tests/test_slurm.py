"""The SLURM path without a cluster: two processes with the variables srun sets form one gloo DDP group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import free_port, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _srun_env(rank: int, ntasks: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
               SLURM_NNODES="1", SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_JOB_ID="4242", SLURM_JOB_NAME="memefx",
               SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow  # spawns processes
def test_simulated_srun_forms_one_ddp_group_and_matches_one_process(tmp_path, tiny_root):
    config = tiny_config(tmp_path, tiny_root)
    cmd = [sys.executable, "-m", "memefx.cli", "validate", "--config", str(config)]
    single = subprocess.run([*cmd, "--trainer.default_root_dir", str(tmp_path / "one")], capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    slurm_cmd = [*cmd, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                 "--trainer.default_root_dir", str(tmp_path / "slurm")]
    port = free_port()
    procs = [subprocess.Popen(slurm_cmd, env=_srun_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    record = json.loads((tmp_path / "slurm" / "provenance_validate.json").read_text())
    assert record["trainer"]["world_size"] == 2  # one group of two, not two runs of one
    assert record["trainer"]["cluster_environment"] == "SLURMEnvironment"
    a = pd.read_parquet(tmp_path / "one" / "predictions" / "dev_seen.parquet")
    b = pd.read_parquet(tmp_path / "slurm" / "predictions" / "dev_seen.parquet")
    pd.testing.assert_frame_equal(a, b, atol=1e-6, rtol=0)
    ma = json.loads((tmp_path / "one" / "miate" / "dev_seen.json").read_text())
    mb = json.loads((tmp_path / "slurm" / "miate" / "dev_seen.json").read_text())
    assert mb["shared_text"]["mean"] == pytest.approx(ma["shared_text"]["mean"], abs=1e-6)


def test_slurm_fragments_and_script_agree():
    slurm = yaml.safe_load((ROOT / "configs/trainer/slurm.yaml").read_text())["trainer"]
    assert slurm["strategy"] == "ddp" and "SLURMEnvironment" in slurm["plugins"][0]["class_path"]
    script = (ROOT / "scripts/slurm/fit.sbatch").read_text()
    assert "srun" in script and "--trainer.devices \"$SLURM_NTASKS_PER_NODE\"" in script
    assert "--trainer.num_nodes \"$SLURM_NNODES\"" in script
