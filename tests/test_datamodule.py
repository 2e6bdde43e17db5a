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


def test_tables_only_mode_on_real_data(tmp_path):
    """Table-only mode reads the meme text from the column named for it: here the HMC text joined onto the
    caption table as ``meme_text``."""
    conf, caps = shared_file("confounders.parquet"), shared_file("hm_captions.parquet")
    hmc = shared_file("hmc/dev_seen.jsonl").parent
    texts = pd.concat([pd.read_json(hmc / f"{s}.jsonl", lines=True, dtype={"id": str}) for s in ("train", "dev_seen")])
    table = pd.read_parquet(caps)
    table["meme_text"] = table.image_id.astype(str).str.zfill(5).map(dict(zip(texts.id, texts.text)))
    table.dropna(subset=["meme_text"]).to_parquet(tmp_path / "captions.parquet")
    dm = MemeDataModule(confounders=str(conf), captions=str(tmp_path / "captions.parquet"), image_side="caption",
                        text_column="meme_text", batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("validate")
    assert len(dm.datasets["val"]) == 500  # dev_seen after de-duplication
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == dm.frames["dev_seen"].label.tolist()[:4]
    assert (dm.frames["dev_seen"].stratum_image >= 0).any()
    dev = pd.read_json(hmc / "dev_seen.jsonl", lines=True, dtype={"id": str}).set_index("id").text
    assert (dm.frames["dev_seen"].text == dm.frames["dev_seen"].id.map(dev)).all()  # the meme's own words


def test_tables_only_needs_caption_mode():
    with pytest.raises(ValueError, match="table-only data"):
        MemeDataModule(confounders="c.parquet", captions="h.parquet", image_side="pixels")


@pytest.mark.parametrize("column,match", [(None, "no meme text: without an HMC folder"),
                                          ("text", "data.text_column='text' is a BLIP-2 description of the image"),
                                          ("text_detailed", "'text_detailed' is a BLIP-2 description")])
def test_tables_only_refuses_a_description_as_the_meme_text(column, match):
    """hm_captions.parquet's `text` column describes the image (it equals the meme text for ~1 meme in 5):
    table-only mode needs an HMC folder or a column that holds the meme text, and says how to give either."""
    with pytest.raises(ValueError, match=match) as err:
        MemeDataModule(confounders="c.parquet", captions="h.parquet", image_side="caption", text_column=column)
    assert "data.root=HMC_DIR" in str(err.value) and "data.text_column=COLUMN" in str(err.value)


def test_synthetic_default_is_written_once_and_reused():
    dm = MemeDataModule(synthetic={"n_memes": 120, "image_size": 16}, image_size=16)
    dm.prepare_data()
    stamp = (dm.root / "synthetic.json").stat().st_mtime_ns
    dm.prepare_data()
    assert (dm.root / "synthetic.json").stat().st_mtime_ns == stamp
    dm.setup("fit")
    assert torch.is_tensor(next(iter(dm.train_dataloader()))["pixel_values"])


def _hmc_without_images(tiny_root, tmp_path, unlabeled: tuple[str, ...] = ("test_seen",)):
    """The synthetic folder as users receive HMC text: jsonl + caption table, no img/, test files unlabeled."""
    import json
    import shutil

    root = tmp_path / "hmc"
    root.mkdir()
    for name in ("train.jsonl", "dev_seen.jsonl", "hm_captions.parquet"):
        shutil.copy(tiny_root / name, root / name)
    for split in unlabeled:
        rows = [json.loads(line) for line in (tiny_root / "test_seen.jsonl").read_text().splitlines()]
        (root / f"{split}.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n"
                                                     for r in rows))
    return root


def test_caption_mode_needs_no_images_and_predicts_several_unlabeled_splits(tiny_root, tmp_path):
    root = _hmc_without_images(tiny_root, tmp_path, ("test_seen", "test_unseen"))
    dm = MemeDataModule(root=str(root), image_side="caption", batch_size=50, max_length=48,
                        test_split=["dev_seen", "test_seen", "test_unseen"], predict_split="test_unseen")
    assert dm.eval_splits("test") == ["dev_seen", "test_seen", "test_unseen"] and dm.split_names["test"] == "dev_seen"
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 3
    for split, loader in zip(dm.eval_splits("test"), loaders):
        batches = list(loader)
        assert {b["split"] for b in batches} == {split}
        labels = torch.cat([b["labels"] for b in batches])
        assert len(labels) == len(dm.frames[split])
        assert (labels == -1).all() if split.startswith("test") else (labels >= 0).all()
    dm.setup("predict")
    single = dm.predict_dataloader()
    assert not isinstance(single, list) and next(iter(single))["split"] == "test_unseen"


def test_pixel_mode_still_checks_every_image(tiny_root, tmp_path):
    from memefx.data.hmc import HMCFormatError

    root = _hmc_without_images(tiny_root, tmp_path)
    with pytest.raises(HMCFormatError, match=r"missing images under .*hmc \(ids \d{5}"):
        MemeDataModule(root=str(root), batch_size=8).setup("fit")


def test_unlabeled_file_as_training_split_names_the_file(tiny_root, tmp_path):
    from memefx.data.hmc import HMCFormatError

    root = _hmc_without_images(tiny_root, tmp_path)
    dm = MemeDataModule(root=str(root), image_side="caption", train_split="test_seen", val_split="dev_seen")
    with pytest.raises(HMCFormatError, match=r"hmc/test_seen\.jsonl: \d+ of \d+ memes of the training split "
                                             r"'test_seen' have no label"):
        dm.setup("fit")


def test_jsonl_id_without_caption_row_is_listed(tiny_root, tmp_path):
    from memefx.data.hmc import HMCFormatError

    root = _hmc_without_images(tiny_root, tmp_path)
    caps = pd.read_parquet(root / "hm_captions.parquet")
    dev_ids = pd.read_json(root / "dev_seen.jsonl", lines=True, dtype={"id": str}).id.tolist()
    caps[~caps.image_id.astype(str).str.zfill(5).isin(dev_ids[:3])].to_parquet(root / "hm_captions.parquet")
    dm = MemeDataModule(root=str(root), image_side="caption")
    with pytest.raises(HMCFormatError, match=rf"3 memes have no 'text_captioned' description: ids {dev_ids[0]}"):
        dm.setup("fit")


def test_empty_or_blank_descriptions_are_listed(tiny_root, tmp_path):
    from memefx.data.hmc import HMCFormatError

    root = _hmc_without_images(tiny_root, tmp_path)
    caps = pd.read_parquet(root / "hm_captions.parquet")
    dev_ids = pd.read_json(root / "dev_seen.jsonl", lines=True, dtype={"id": str}).id.tolist()
    caps.loc[caps.image_id.astype(str).str.zfill(5).isin(dev_ids[:2]), "text_captioned"] = ["", "  \n"]
    caps.to_parquet(root / "hm_captions.parquet")
    dm = MemeDataModule(root=str(root), image_side="caption")
    with pytest.raises(HMCFormatError, match=r"2 memes have an empty or whitespace-only 'text_captioned' description"):
        dm.setup("fit")


def test_max_length_too_small_for_the_pair(tiny_root, tmp_path):
    root = _hmc_without_images(tiny_root, tmp_path)
    with pytest.raises(ValueError, match=r"data.max_length=4 cannot hold the 3 special tokens"):
        MemeDataModule(root=str(root), image_side="caption", max_length=4).setup("fit")


def test_train_memes_copied_into_an_evaluation_split_warn(tiny_root, tmp_path):
    root = _hmc_without_images(tiny_root, tmp_path)
    train = (root / "train.jsonl").read_text().splitlines()
    with open(root / "dev_seen.jsonl", "a") as f:
        f.write(train[0] + "\n" + train[1] + "\n")
    dm = MemeDataModule(root=str(root), image_side="caption", confounders=None)
    with pytest.warns(UserWarning, match=r"split 'dev_seen': 2 ids also in 'train' \(\d{5}, \d{5}\)"):
        dm.setup("fit")
