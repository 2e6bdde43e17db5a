"""A run stopped at an epoch boundary and resumed from its checkpoint ends like an uninterrupted run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from lightning.pytorch.callbacks import Callback

from memefx.cli import main
from tests.conftest import tiny_config


class StopAfterFirstEpoch(Callback):
    """Stands in for a run killed after epoch 0 (same config, so the same LR schedule)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.slow  # three fits: about 50 s
def test_resume_equals_uninterrupted(tmp_path, tiny_root):
    config = tiny_config(tmp_path, tiny_root, midas=True)
    common = ["--config", str(config), "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "2"]
    main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "full")])
    part = tmp_path / "part"
    main(["fit", *common, "--trainer.default_root_dir", str(part),
          "--trainer.callbacks+=tests.test_resume.StopAfterFirstEpoch"])
    assert not (part / "midas" / "train_epoch1.parquet").exists()
    ckpt = next(part.rglob("epoch=0-*.ckpt"))
    main(["fit", *common, "--trainer.default_root_dir", str(part), "--ckpt_path", str(ckpt)])
    for name in ("midas/train_epoch1.parquet", "midas/val_epoch1.parquet", "predictions/dev_seen.parquet"):
        a, b = pd.read_parquet(tmp_path / "full" / name), pd.read_parquet(part / name)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    a = json.loads((tmp_path / "full" / "miate" / "dev_seen.json").read_text())
    b = json.loads((part / "miate" / "dev_seen.json").read_text())
    assert b.pop("checkpoint") is not None and a.pop("checkpoint") is None  # where the run came from, not a result
    assert a == b
