"""MIDASCallback in a real Trainer: exact train-stage gradients, eval stage, memory bound, tables."""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from memefx.attribution.midas import reduce_layers, to_table
from memefx.callbacks.midas import PLAIN, MIDASCallback
from memefx.data.datamodule import MemeDataModule
from memefx.models.module import MemeClassifier
from tests.conftest import TINY_BACKBONE


def _setup(tiny_root, **model_kwargs):
    torch.manual_seed(0)
    dm = MemeDataModule(root=str(tiny_root), image_size=32, batch_size=16, vocab_size=512)
    model = MemeClassifier(backbone_args={**TINY_BACKBONE, "dropout": 0.0}, miate_bootstrap=10, **model_kwargs)
    return dm, model


def _trainer(tmp_path, callbacks, **kwargs):
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


def _explicit_table(model, batches, stage, epoch, target="gold"):
    """Per-sample autograd of the target probability, one sample at a time (the slow reference)."""
    model.eval()
    tables = []
    for batch in batches:
        out = model(batch, output_attentions=True)
        probs = out.logits.softmax(-1)
        labels = batch["labels"]
        grads = [torch.zeros_like(a) for a in out.attentions]
        for b in range(len(labels)):
            g = torch.autograd.grad(probs[b, labels[b]], out.attentions, retain_graph=True)
            for layer in range(len(grads)):
                grads[layer][b] = g[layer][b]
        reduced = reduce_layers(out.attentions, grads, out.segments)
        tables.append(to_table(batch["ids"], {k: v.numpy() for k, v in reduced.items()}, epoch, stage,
                               list(range(len(grads)))))
    return pd.concat(tables, ignore_index=True)


def _compare(got: pd.DataFrame, expected: pd.DataFrame, rtol: float = 1e-5) -> None:
    keys = ["id", "layer", "head", "block", "score"]
    merged = got.merge(expected, on=keys, suffixes=("", "_ref"))
    assert len(merged) == len(expected) == len(got)
    assert np.array_equal(merged["count"], merged["count_ref"])
    for score, rows in merged.groupby("score"):
        err = np.abs(rows["sum"] - rows["sum_ref"]).max()
        assert err <= rtol * np.abs(rows["sum_ref"]).max() + 1e-12, (score, err)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_stage_equals_explicit_gold_gradient(tmp_path, tiny_root, accumulate):
    dm, model = _setup(tiny_root, lr=0.0, scheduler="constant")  # lr 0: weights stay as the reference sees them
    trainer = _trainer(tmp_path, [MIDASCallback(stages=["train"])], limit_train_batches=4, limit_val_batches=0,
                       accumulate_grad_batches=accumulate)
    trainer.fit(model, datamodule=dm)
    got = pd.read_parquet(tmp_path / "midas" / "train_epoch0.parquet")
    seen = sorted(set(got.id))
    assert len(seen) == 64
    data = dm.datasets["train"]
    position = {i: k for k, i in enumerate(data.frame.id)}
    collate = dm.train_dataloader().collate_fn
    batches = [collate([data[position[i]] for i in seen[k:k + 16]]) for k in range(0, 64, 16)]
    grads = got[got.score == "gradient"]
    assert (grads["sum"].abs() > 0).any()
    _compare(got, _explicit_table(model, batches, "train", 0))


@pytest.mark.slow  # about 30 s
def test_train_every_n_steps_captures_one_batch_in_n(tmp_path, tiny_root, monkeypatch):
    dm, model = _setup(tiny_root, lr=0.0, scheduler="constant")
    captures = []
    original = model.backbone.forward

    def spy(batch, output_attentions=False):
        captures.append(output_attentions)
        return original(batch, output_attentions=output_attentions)

    monkeypatch.setattr(model.backbone, "forward", spy)
    trainer = _trainer(tmp_path, [MIDASCallback(stages=["train"], train_every_n_steps=2)], limit_train_batches=5,
                       limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert captures == [True, False, True, False, True]  # batches 0, 2, 4 captured; the others run SDPA
    got = pd.read_parquet(tmp_path / "midas" / "train_epoch0.parquet")
    assert got.attrs["midas"] == {"every_n_steps": 2, "captured_batches": 3, "target": "gold"}
    order = [i for batch in dm.train_dataloader() for i in batch["ids"]][:80]
    captured_ids = order[0:16] + order[32:48] + order[64:80]
    assert sorted(set(got.id)) == sorted(captured_ids)
    data = dm.datasets["train"]
    position = {i: k for k, i in enumerate(data.frame.id)}
    collate = dm.train_dataloader().collate_fn
    batches = [collate([data[position[i]] for i in captured_ids[k:k + 16]]) for k in range(0, 48, 16)]
    _compare(got, _explicit_table(model, batches, "train", 0))
    with pytest.raises(ValueError, match="train_every_n_steps=0"):
        MIDASCallback(train_every_n_steps=0)


@pytest.mark.slow  # about 25 s
def test_eval_stage_single_backward_equals_per_sample_loop(tmp_path, tiny_root):
    dm, model = _setup(tiny_root)
    trainer = _trainer(tmp_path, [MIDASCallback(stages=["val"])], limit_val_batches=2)
    trainer.validate(model, datamodule=dm)
    got = pd.read_parquet(tmp_path / "midas" / "val_ckpt_epochinit.parquet")  # validate() of untrained weights
    batches = list(dm.val_dataloader())[:2]
    _compare(got, _explicit_table(model, batches, "val", -1))
    assert got.attrs["midas"] == {"every_n_steps": 1, "captured_batches": 2, "target": "gold"}
    assert set(got.stage) == {"val"} and set(got.score) == {"attention", "gradient", "attattr"}


class _Probe(Callback):
    """After every training step, record every tensor the MIDAS callback or the module still holds."""

    def __init__(self, midas):
        self.midas, self.seen = midas, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t = batch["input_ids"].shape[1] + 5  # text tokens + visual tokens
        held = [np.asarray(a).shape for buf in self.midas._buffers.values() for k, v in buf.items()
                if k not in PLAIN for a in v]
        self.seen.append((t, held, pl_module._kept))  # what the module still holds after the step


def test_callback_holds_no_token_by_token_tensor(tmp_path, tiny_root):
    dm, model = _setup(tiny_root)
    midas = MIDASCallback(stages=["train"])
    probe = _Probe(midas)
    _trainer(tmp_path, [midas, probe], limit_train_batches=3, limit_val_batches=0).fit(model, datamodule=dm)
    assert len(probe.seen) == 3
    for t, shapes, captured in probe.seen:
        assert captured is None
        assert shapes and all(t not in shape[1:] for shape in shapes), shapes
        assert all(len(s) in (2, 4) for s in shapes)  # (B, 4) counts or (B, layers, heads, blocks)


def test_checkpointed_state_round_trips(tiny_root):
    midas = MIDASCallback(stages=["val"])
    reduced = {"attention": torch.ones(2, 2, 2, 4), "gradient": torch.zeros(2, 2, 2, 4),
               "attattr": torch.ones(2, 2, 2, 4), "count": torch.ones(2, 4)}
    midas._add("val", 3, ["00001", "00002"], reduced, [0, 1])
    clone = MIDASCallback(stages=["val"])
    clone.load_state_dict(midas.state_dict())
    assert clone._buffers["val"]["ids"] == ["00001", "00002"] and clone._buffers["val"]["epoch"] == 3
    assert np.array_equal(clone._buffers["val"]["attattr"][0].numpy(), np.ones((2, 2, 2, 4)))
    assert clone._buffers["val"]["batches"] == 1


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="stages"):
        MIDASCallback(stages=["training"])
    with pytest.raises(ValueError, match="target"):
        MIDASCallback(target="loss")


def test_heatmap_of_a_revalidated_checkpoint_gets_its_own_key(tmp_path, tiny_root):
    """A loggers' image of the post-fit validation is not one more point of the fit's per-epoch series."""
    from lightning.pytorch.loggers import CSVLogger

    class ImageLogger(CSVLogger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.images = []

        def log_image(self, key, images, step=None):
            self.images.append((key, step))

    dm, model = _setup(tiny_root)
    logger = ImageLogger(tmp_path)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=logger,
                        limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[MIDASCallback(stages=["val"])], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    trainer.validate(model, datamodule=dm)
    assert [k for k, _ in logger.images] == ["midas/val_cross_heatmap", "midas/val_ckpt_cross_heatmap"]
