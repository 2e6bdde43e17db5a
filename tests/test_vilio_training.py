"""Training the paper's Vilio models with memefx: from random weights on a synthetic region TSV (the loss
falls; a run killed mid-epoch and resumed with ``--ckpt_path last`` ends as an uninterrupted one), and
fine-tuning from a Vilio checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from memefx.cli import main
from memefx.report.compare import compare_runs
from tests.conftest import CONF
from tests.vilio_fixtures import oracle_root, synthetic_region_tsv

TINY_BERT = {"model_type": "bert", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12, "pad_token_id": 0}


def _config(tmp_path, tiny_root, family: str = "uniter"):
    """The packaged config, with a tiny random BERT folder, the synthetic data and a synthetic region TSV."""
    bert = tmp_path / "bert"
    bert.mkdir(exist_ok=True)
    (bert / "config.json").write_text(json.dumps(TINY_BERT))
    tsv = synthetic_region_tsv(tiny_root, tmp_path / "regions.tsv", n_regions=6, dim=32)
    cfg = yaml.safe_load(open(f"configs/experiment/vilio_{family}.yaml"))
    cfg["trainer"].update(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" in c["class_path"]]
    cfg["trainer"]["callbacks"] += yaml.safe_load((CONF / "checkpoint_every_3_steps.yaml").read_text())
    cfg["trainer"]["callbacks"] += yaml.safe_load((CONF / "midas.yaml").read_text())
    cfg["model"].update(lr=2e-3, miate_bootstrap=20)
    cfg["model"]["backbone_args"].update(bert=str(bert), region_dim=32)
    cfg["data"].update(root=str(tiny_root), region_features=str(tsv), vocab_size=512, max_length=24, batch_size=16,
                       test_split="dev_seen", predict_split="dev_seen")
    path = tmp_path / f"vilio_{family}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config, run, *extra):
    cmd = [sys.executable, "-m", "memefx.cli", "fit", "--config", str(config), "--trainer.max_epochs", "2",
           "--trainer.limit_train_batches", "8", "--trainer.default_root_dir", str(run), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow  # trains for a minute
@pytest.mark.parametrize("family", ["uniter", "oscar", "visualbert"])
def test_training_from_random_weights_lowers_the_loss(family, tmp_path, tiny_root):
    config = _config(tmp_path, tiny_root, family)
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--trainer.max_epochs", "6", "--trainer.default_root_dir", str(run)]) == 0
    curves = pd.read_csv(next((run / "logs").glob("version_*/metrics.csv")))
    losses = curves.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].mean()
    assert losses.iloc[-1] < 0.9 * losses.iloc[0], losses.tolist()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/auroc"] > 0.7, metrics  # the planted picture x text interaction is learnable
    assert (run / "predictions" / "dev_seen.parquet").is_file() and (run / "miate" / "dev_seen.json").is_file()


@pytest.mark.slow  # spawns processes
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, tiny_root):
    from tests.test_kill_resume import KillAtStep  # noqa: F401  (the callback the killed process loads)

    config = _config(tmp_path, tiny_root)
    full = _fit(config, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "killed"
    killed = _fit(config, run, "--trainer.callbacks+=tests.test_kill_resume.KillAtStep", "--trainer.callbacks.step=5")
    assert killed.returncode == -signal.SIGKILL
    resumed = _fit(config, run, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info, results = compare_runs(tmp_path / "full", run, atol=0.0, rtol=0.0)
    assert results == [], results


def test_fine_tuning_starts_from_the_vilio_checkpoint(tmp_path):
    """``fit`` with ``backbone_args.checkpoint``: the first weights are the checkpoint's, then they train."""
    root = oracle_root("U", tmp_path / "data")
    shutil.copy(root / "dev_seen.jsonl", root / "train.jsonl")
    run = tmp_path / "run"
    assert main(["fit", "--config", "configs/experiment/vilio_uniter.yaml", "--data.root", str(root),
                 "--data.region_features", str(root / "regions.tsv"), "--data.tokenizer", str(root / "bert"),
                 "--model.backbone_args.bert", str(root / "bert"), "--model.backbone_args.checkpoint",
                 str(root / "state_dict.pt"), "--model.lr", "1e-3", "--trainer.max_epochs", "3",
                 "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
                 "--trainer.default_root_dir", str(run)]) == 0
    trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    start = torch.load(root / "state_dict.pt")
    key = "model.encoder.layer.0.attention.self.query.weight"
    assert trained[f"backbone.{key}"].shape == start[key].shape
    assert not torch.equal(trained[f"backbone.{key}"], start[key])  # it trained
    assert torch.allclose(trained[f"backbone.{key}"], start[key], atol=0.05)  # from the checkpoint, not from scratch
