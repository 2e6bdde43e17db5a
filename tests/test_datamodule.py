"""Batch contents of MemeDataModule in pixel, caption and table-only modes."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

from memefx.data.collate import IMAGE, PAD, SPECIAL, TEXT
from memefx.data.datamodule import MemeDataModule
from memefx.data.strata import stratum_lookup
from memefx.data.tables import read_confounders
from tests.conftest import shared_file


def test_pixel_batch_contents(tiny_root):
    dm = MemeDataModule(root=str(tiny_root), image_size=32, batch_size=16, vocab_size=512)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) >= {"ids", "input_ids", "attention_mask", "token_type_ids", "segments", "pixel_values",
                          "labels", "stratum_image", "stratum_text"}
    assert batch["pixel_values"].shape == (16, 3, 32, 32)
    assert batch["segments"].shape == batch["input_ids"].shape
    assert set(batch["segments"].unique().tolist()) <= {SPECIAL, TEXT, PAD}
    frame = pd.read_json(tiny_root / "dev_seen.jsonl", lines=True, dtype={"id": str})
    assert batch["ids"] == frame.id.tolist()[:16]
    assert batch["labels"].tolist() == frame.label.tolist()[:16]
    lookup = stratum_lookup(read_confounders(tiny_root / "confounders.parquet"), "dev_seen")
    expect = [lookup["shared_image"].get(i, -1) for i in batch["ids"]]
    assert batch["stratum_image"].tolist() == expect
    assert len(dm.tokenizer) <= 512


def test_caption_mode_pairs_description_as_image_segment(tiny_root):
    dm = MemeDataModule(root=str(tiny_root), image_side="caption", batch_size=8, max_length=64)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert "pixel_values" not in batch
    assert (batch["segments"] == IMAGE).any(dim=1).all()
    tokens = dm.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["segments"][0] == IMAGE].tolist())
    assert "background" in tokens


def test_tables_only_mode_on_real_data():
    conf, caps = shared_file("confounders.parquet"), shared_file("hm_captions.parquet")
    dm = MemeDataModule(confounders=str(conf), captions=str(caps), image_side="caption", batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("validate")
    assert len(dm.datasets["val"]) == 500  # dev_seen after de-duplication
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == dm.frames["dev_seen"].label.tolist()[:4]
    assert (dm.frames["dev_seen"].stratum_image >= 0).any()


def test_tables_only_needs_caption_mode():
    with pytest.raises(ValueError, match="table-only data"):
        MemeDataModule(confounders="c.parquet", captions="h.parquet", image_side="pixels")


def test_synthetic_default_is_written_once_and_reused():
    dm = MemeDataModule(synthetic={"n_memes": 120, "image_size": 16}, image_size=16)
    dm.prepare_data()
    stamp = (dm.root / "synthetic.json").stat().st_mtime_ns
    dm.prepare_data()
    assert (dm.root / "synthetic.json").stat().st_mtime_ns == stamp
    dm.setup("fit")
    assert torch.is_tensor(next(iter(dm.train_dataloader()))["pixel_values"])
