"""Known-answer properties of the synthetic generator (SPEC section 1)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memefx.data.synthetic import SHORTCUT_WORD, SyntheticConfig, generate_memes, truth_table, write_synthetic


def _digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = SyntheticConfig(n_memes=150, seed=7, image_size=24)
    a = write_synthetic(tmp_path / "a", cfg)
    b = write_synthetic(tmp_path / "b", cfg)
    c = write_synthetic(tmp_path / "c", SyntheticConfig(n_memes=150, seed=8, image_size=24))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_hmc_layout_and_ids(tiny_root):
    for split in ("train", "dev_seen", "test_seen"):
        rows = [json.loads(line) for line in (tiny_root / f"{split}.jsonl").read_text().splitlines()]
        assert rows and all(set(r) == {"id", "img", "text", "label"} for r in rows)
        assert all(len(r["id"]) == 5 and r["id"].isdigit() for r in rows)
        assert all((tiny_root / r["img"]).is_file() for r in rows)
    assert Image.open(tiny_root / rows[0]["img"]).size == (32, 32)
    assert set(pd.read_parquet(tiny_root / "hm_captions.parquet").columns) >= {"image_id", "text_captioned"}


def test_labels_are_intersectional_with_noise_in_train_only():
    truth = truth_table(generate_memes(SyntheticConfig(n_memes=20_000, seed=1, label_noise=0.1)))
    assert (truth.clean_label == (truth.text_attr & truth.image_attr)).all()
    train = truth[truth.split == "train"]
    flip = (train.label != train.clean_label).mean()
    se = np.sqrt(0.1 * 0.9 / len(train))
    assert abs(flip - 0.1) < 4 * se, flip
    evaluation = truth[truth.split != "train"]
    assert (evaluation.label == evaluation.clean_label).all()
    # neither modality alone decides: each attribute alone leaves the label uncertain
    for attr in ("text_attr", "image_attr"):
        rate = truth[truth[attr] == 1].clean_label.mean()
        assert 0.2 < rate < 0.8


def test_every_hateful_meme_has_benign_confounders_of_both_kinds():
    truth = truth_table(generate_memes(SyntheticConfig(n_memes=3000, seed=2, label_noise=0.0)))
    hateful = truth[truth.clean_label == 1]
    assert (hateful.img_org_id == hateful.id).all() and (hateful.txt_org_id == hateful.id).all()
    for column, same in (("img_org_id", "image_crc"), ("txt_org_id", "text")):
        groups = truth[truth[column] != "No Confounder"].groupby(column)
        complete = [g for _, g in groups if len(g) >= 2]  # a family cut at n_memes may be a singleton
        assert complete
        for g in complete:
            assert set(g.clean_label) == {0, 1}
            assert g[same].nunique() == 1  # the shared modality is identical
            assert g.split.nunique() == 1


def test_shortcuts_only_in_train():
    truth = truth_table(generate_memes(SyntheticConfig(n_memes=3000, seed=4, text_shortcut=1.0)))
    has_word = truth.text.str.endswith(SHORTCUT_WORD)
    assert (has_word == ((truth.split == "train") & (truth.label == 1))).all()


@pytest.mark.parametrize("field,value", [("n_memes", 0), ("label_noise", 0.5), ("split_fractions", (0.5, 0.5, 0.5))])
def test_invalid_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_synth_refuses_a_folder_that_holds_files_and_replaces_only_its_own(tmp_path, capsys):
    from memefx.cli import main

    folder = tmp_path / "hmc"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"id": 1, "img": "img/00001.png", "text": "mine", "label": 0}\n')
    (folder / "notes.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["synth", "--out", str(folder), "--n-memes", "300"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing touched
    first = write_synthetic(tmp_path / "s", SyntheticConfig(n_memes=300, seed=1, image_size=16))
    old_images = {p.name for p in (first / "img").iterdir()}
    assert main(["synth", "--out", str(first), "--n-memes", "300", "--seed", "2", "--image-size", "16",
                 "--overwrite", "true"]) == 0
    new_images = {p.name for p in (first / "img").iterdir()}
    assert old_images != new_images
    truth = pd.read_parquet(first / "truth.parquet")
    assert new_images == {f"{i}.png" for i in truth.id}  # no image of the earlier dataset left behind


def test_too_few_memes_for_every_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"n_memes=5 leaves split\(s\) \[.*\] without memes"):
        write_synthetic(tmp_path / "tiny", SyntheticConfig(n_memes=5, seed=0, image_size=8))
    assert not (tmp_path / "tiny" / "train.jsonl").exists()
