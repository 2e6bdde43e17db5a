"""MIDASCallback and RunDirectory work with any LightningModule that implements memefx.contract, not only
MemeClassifier: a minimal module of its own here, written from the contract alone."""

from __future__ import annotations

import json

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from memefx.callbacks.midas import MIDASCallback
from memefx.callbacks.run_directory import RunDirectory
from memefx.contract import AttentionCapture, EvalCapture, EvalStepOutput, EvaluationResults, TrainCapture
from memefx.data.datamodule import MemeDataModule
from memefx.models.backbones import build_backbone
from tests.conftest import TINY_BACKBONE
from tests.test_midas_callback import _compare, _explicit_table


class Minimal(L.LightningModule):
    """A plain classifier that implements the contract and nothing memefx-specific besides."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = build_backbone("visualbert", **{**TINY_BACKBONE, "dropout": 0.0})
        self._train, self._eval, self._kept, self._results = False, frozenset(), None, {}

    def request_capture(self, train, eval_stages=()):
        self._train, self._eval = train, frozenset(eval_stages)

    def pop_capture(self):
        kept, self._kept = self._kept, None
        return kept

    def evaluation_results(self):
        return self._results

    def forward(self, batch, output_attentions=False):
        return self.backbone(batch, output_attentions=output_attentions)

    def training_step(self, batch, batch_idx):
        out = self(batch, output_attentions=self._train)
        if self._train:
            p_gold = out.logits.detach().softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
            self._kept = TrainCapture(out.attentions, out.segments, p_gold, list(batch["ids"]))
        return F.cross_entropy(out.logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        capture = None
        if "val" in self._eval and not self.trainer.sanity_checking:
            with torch.inference_mode(False), torch.enable_grad():
                batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
                out = self(batch, output_attentions=True)
            capture = EvalCapture("val", out.logits, out.attentions, out.segments, batch["labels"], list(batch["ids"]))
        else:
            out = self(batch)
        p = out.logits.detach().softmax(-1)[:, 1]
        self._results[batch["split"]] = {"split": batch["split"], "stage": "val", "note": "minimal"}
        return EvalStepOutput(list(batch["ids"]), batch["labels"].cpu(), p.cpu(), batch["split"], capture)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_callbacks_work_with_a_module_that_only_implements_the_contract(tmp_path, tiny_root):
    model = Minimal()
    assert isinstance(model, AttentionCapture) and isinstance(model, EvaluationResults)
    dm = MemeDataModule(root=str(tiny_root), image_size=32, batch_size=16, vocab_size=512)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0,
                        callbacks=[MIDASCallback(stages=["train", "val"]), RunDirectory()])
    trainer.fit(model, datamodule=dm)
    got = pd.read_parquet(tmp_path / "midas" / "val_epoch0.parquet")
    _compare(got, _explicit_table(model, list(dm.val_dataloader())[:2], "val", 0))
    train = pd.read_parquet(tmp_path / "midas" / "train_epoch0.parquet")
    assert train.id.nunique() == 32 and (train[train.score == "gradient"]["sum"].abs() > 0).any()
    predictions = pd.read_parquet(tmp_path / "predictions" / "dev_seen.parquet")
    assert len(predictions) == 32 and predictions.p_hateful.between(0, 1).all()
    assert json.loads((tmp_path / "miate" / "dev_seen.json").read_text())["note"] == "minimal"
    assert not hasattr(model, "capture_attentions") and not hasattr(model, "captured")  # nothing set on it


def test_midas_refuses_a_module_without_the_contract(tmp_path, tiny_root):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(torch.ones(1, 1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False,
                        enable_progress_bar=False, callbacks=[MIDASCallback()])
    with pytest.raises(TypeError, match=r"MIDASCallback needs a LightningModule with request_capture\(\) and "
                                        r"pop_capture\(\).*Plain has neither"):
        trainer.fit(Plain(), datamodule=MemeDataModule(root=str(tiny_root), image_size=32, vocab_size=512))
