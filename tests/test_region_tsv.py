"""Vilio's region TSV: indexed once, read by picture, normalized as Vilio's loader; bad lines named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import memefx.data.region_tsv as region_tsv
from memefx.data.datamodule import MemeDataModule
from memefx.data.hmc import HMCFormatError
from memefx.data.region_tsv import RegionTSV, build_index, picture_key
from memefx.data.regions import open_regions
from tests.vilio_fixtures import oracle_dir, oracle_root, random_boxes, tsv_line


def _pictures(tmp_path, n=3, regions=4, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    lines, truth = [], {}
    for k in range(n):
        boxes, feats = random_boxes(rng, regions, 60, 80), rng.normal(size=(regions, dim)).astype(np.float32)
        truth[str(k + 1)] = (boxes.astype(np.float32), feats)
        lines.append(tsv_line(f"{k + 1}", 60, 80, boxes, feats))
    path = tmp_path / "regions.tsv"
    path.write_text("".join(lines))
    return path, truth


def test_picture_keys_match_vilio_int_ids():
    assert picture_key("img/00101.png") == picture_key("101") == picture_key("00101") == "101"
    assert picture_key("img/cat_1.jpg") == "cat_1"


def test_reads_each_picture_normalized_as_vilio(tmp_path):
    path, truth = _pictures(tmp_path)
    regions = RegionTSV(path)
    feats, boxes = regions.load("any-meme", "img/00002.png")
    ref_boxes, ref_feats = truth["2"]
    assert torch.equal(feats, torch.from_numpy(ref_feats))
    expected = ref_boxes.copy()
    expected[:, (0, 2)] /= 80
    expected[:, (1, 3)] /= 60
    assert torch.equal(boxes, torch.from_numpy(expected))  # float32 division, as Vilio's loader
    first_two = RegionTSV(path, count=2).load("m", "img/2.png")
    assert torch.equal(first_two[0], feats[:2]) and torch.equal(first_two[1], boxes[:2])


def test_oracle_tsv_gives_the_oracle_features_and_boxes():
    src = oracle_dir("O")
    inputs = torch.load(src / "inputs.pt")
    regions = RegionTSV(src / "regions.tsv")
    for row, picture in enumerate([101, 101, 202, 303]):
        feats, boxes = regions.load(str(picture), f"img/{picture:05d}.png")
        assert torch.equal(feats, inputs["feats"][row]) and torch.equal(boxes, inputs["boxes"][row])


def test_index_is_built_once_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path, _ = _pictures(tmp_path)
    RegionTSV(path)
    calls = []
    original = region_tsv.build_index
    monkeypatch.setattr(region_tsv, "build_index", lambda p: calls.append(p) or original(p))
    RegionTSV(path)
    assert calls == []  # the cached index, no second scan
    with open(path, "a") as f:
        f.write(tsv_line("9", 10, 10, np.array([[0, 0, 5, 5]]), np.ones((1, 8))))
    assert "9" in RegionTSV(path).index and len(calls) == 1


def test_two_memes_on_one_picture_share_its_regions(tmp_path):
    path, _ = _pictures(tmp_path)
    regions = RegionTSV(path)
    a, b = regions.load("00011", "img/00001.png"), regions.load("00012", "img/00001.png")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda line: line.replace("\t", " ", 1), r"regions.tsv:2: 9 tab-separated fields, expected 10"),
    (lambda line: line.replace("\t4\t", "\t5\t", 1), r"regions.tsv:2: picture 2: num_boxes=5 but the boxes field holds 4 boxes"),
    (lambda line: line.replace("\t60\t", "\tsixty\t", 1), r"regions.tsv:2: picture 2: img_h, img_w and num_boxes must be integers"),
])
def test_bad_lines_name_the_line_and_picture(tmp_path, mutate, message):
    path, _ = _pictures(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = mutate(lines[1])
    path.write_text("".join(lines))
    with pytest.raises(HMCFormatError, match=message):
        build_index(path)


def test_duplicate_picture_and_empty_file_are_errors(tmp_path):
    path, _ = _pictures(tmp_path)
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[0])
    with pytest.raises(HMCFormatError, match=r"regions.tsv:4: picture 1 is listed twice \(lines 1 and 4\)"):
        build_index(path)
    path.write_text("")
    with pytest.raises(HMCFormatError, match="no region lines"):
        build_index(path)


def test_missing_picture_and_short_picture_are_named_at_setup(tmp_path):
    path, _ = _pictures(tmp_path, regions=4)
    frame = pd.DataFrame({"id": ["00011", "00012"], "img": ["img/00001.png", "img/00007.png"]})
    with pytest.raises(HMCFormatError, match=r"1 memes' pictures have no line.*00012 \(img/00007.png\)"):
        RegionTSV(path).check(frame)
    with pytest.raises(HMCFormatError, match=r"fewer than data.region_count=5 regions: 1 \(line 1: 4\)"):
        RegionTSV(path, count=5).check(frame.iloc[:1])
    assert RegionTSV(path, count=4).check(frame.iloc[:1]) == 8
    with pytest.raises(ValueError, match="region_count=0"):
        open_regions(path, 0)
    with pytest.raises(HMCFormatError, match="no such file or folder"):
        open_regions(tmp_path / "nope.tsv")


def test_evaluation_folder_needs_no_training_split_with_a_given_tokenizer(tmp_path):
    """A folder with only the split to evaluate (as a user with a checkpoint has) sets up for predict."""
    root = oracle_root("U", tmp_path / "data")
    assert not (root / "train.jsonl").exists()
    dm = MemeDataModule(root=str(root), image_side="regions", region_features="regions.tsv",
                        tokenizer=str(root / "bert"), predict_split="dev_seen", batch_size=4)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["ids"] == ["00101", "00102", "00202", "00303"]
    assert torch.equal(batch["region_features"][0], batch["region_features"][1])  # one picture, two memes
    assert batch["region_features"].shape == (4, 5, 2048)
    with pytest.raises(HMCFormatError, match=r"train.jsonl: split file not found"):  # training still needs it
        MemeDataModule(root=str(root), image_side="regions", region_features="regions.tsv",
                       tokenizer=str(root / "bert")).setup("fit")
