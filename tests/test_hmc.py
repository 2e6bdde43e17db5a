"""Bad input gets a clear error naming file, line, id and value; odd but valid input is accepted."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from memefx.data.hmc import HMCFormatError, check_images, load_image, normalize_id, read_hmc, read_split
from memefx.data.tables import check_confounders_cover, read_captions, read_confounders


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(i, label=0, text="hello", img=None):
    return json.dumps({"id": i, "img": img or f"img/{i}.png", "text": text, "label": label})


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "train.jsonl", [_row("00001"), '{"id": 2, "img": "img/2.png",'])
    with pytest.raises(HMCFormatError, match=r"train\.jsonl:2: malformed JSON"):
        read_split(path)


def test_duplicate_ids_listed_with_lines(tmp_path):
    path = _write(tmp_path / "train.jsonl", [_row("00001"), _row(2), _row(1)])
    with pytest.raises(HMCFormatError, match=r"1 duplicate ids: 00001 \(lines 1/3\)"):
        read_split(path)


@pytest.mark.parametrize("label", [2, -1, None, "1"])
def test_label_outside_0_1_in_labeled_split(tmp_path, label):
    path = _write(tmp_path / "dev_seen.jsonl", [_row(1), _row(5, label=label)])
    with pytest.raises(HMCFormatError, match=r"dev_seen\.jsonl:2: id 00005: label .* is not 0 or 1"):
        read_split(path)


def test_test_split_may_omit_labels_and_ids_may_be_ints(tmp_path):
    path = _write(tmp_path / "test_unseen.jsonl", [json.dumps({"id": 1456, "img": "img/01456.png", "text": ""})])
    frame = read_split(path)
    assert frame.id.tolist() == ["01456"] and frame.label.tolist() == [-1] and frame.text.tolist() == [""]


def test_missing_key_and_bad_id(tmp_path):
    with pytest.raises(HMCFormatError, match=r"train\.jsonl:1: missing key 'img'"):
        read_split(_write(tmp_path / "train.jsonl", [json.dumps({"id": 1, "text": "x", "label": 0})]))
    with pytest.raises(HMCFormatError, match=r"id 'abc' is not an integer"):
        normalize_id("abc", "here")


def test_missing_and_unreadable_images_listed_with_count(tiny_root, tmp_path):
    root = tmp_path / "hmc"
    shutil.copytree(tiny_root, root)
    frame = read_split(root / "dev_seen.jsonl")
    gone = frame.id.tolist()[:12]
    for i in gone:
        (root / "img" / f"{i}.png").unlink()
    with pytest.raises(HMCFormatError, match=r"12 missing images .* \(ids 00\d+|12 missing images") as err:
        read_hmc(root, ["dev_seen"])
    assert gone[0] in str(err.value) and "..." in str(err.value)
    broken = frame.id.tolist()[20]
    (root / "img" / f"{broken}.png").write_bytes(b"not a png")
    with pytest.raises(HMCFormatError, match=rf"1 unreadable images \(ids {broken}"):
        check_images(root, frame.iloc[20:21])


def test_missing_split_file_lists_present_ones(tiny_root):
    with pytest.raises(HMCFormatError, match=r"dev_unseen\.jsonl: split file not found \(present: .*train\.jsonl"):
        read_hmc(tiny_root, ["dev_unseen"], images=False)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_grayscale_palette_rgba_become_rgb(tmp_path, mode):
    path = tmp_path / f"im_{mode}.png"
    Image.new(mode, (8, 6)).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (8, 6)


def test_rgba_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def _confounders(tmp_path, rows, name="conf.parquet"):
    path = tmp_path / name
    pd.DataFrame(rows, columns=["id", "split", "label", "img_org_id", "txt_org_id"]).to_parquet(path)
    return path


def test_side_table_missing_columns(tmp_path):
    path = tmp_path / "conf.parquet"
    pd.DataFrame({"id": ["00001"], "split": ["train"]}).to_parquet(path)
    with pytest.raises(HMCFormatError, match=r"conf\.parquet: missing columns \['label', 'img_org_id', 'txt_org_id'\]"):
        read_confounders(path)


def test_exact_duplicates_warn_and_dedupe_conflicts_fail(tmp_path):
    row = ["00001", "dev_seen", 1, "00001", "Not hit"]
    path = _confounders(tmp_path, [row, row, ["00002", "dev_seen", 0, "00001", "No Confounder"]])
    with pytest.warns(UserWarning, match=r"removed 1 exact duplicate rows \(1 keys listed twice\)"):
        table = read_confounders(path)
    assert len(table) == 2 and table.txt_org_id.isna().all()
    clash = _confounders(tmp_path, [row, ["00001", "dev_seen", 0, "00001", "Not hit"]], "clash.parquet")
    with pytest.raises(HMCFormatError, match=r"conflicting rows: dev_seen/00001"):
        read_confounders(clash)


def test_confounder_ids_unknown_to_the_data(tmp_path):
    memes = pd.DataFrame({"id": ["00001"], "split": ["train"], "label": [1]})
    table = read_confounders(_confounders(tmp_path, [["00001", "train", 1, "00001", "Not hit"],
                                                     ["00999", "train", 0, "00001", "Not hit"]]))
    with pytest.raises(HMCFormatError, match=r"1 ids not present in the loaded data \(split/id: train/00999\)"):
        check_confounders_cover(table, memes, "conf.parquet")


def test_confounder_label_disagreeing_with_jsonl(tmp_path):
    memes = pd.DataFrame({"id": ["00001"], "split": ["train"], "label": [0]})
    table = read_confounders(_confounders(tmp_path, [["00001", "train", 1, "00001", "Not hit"]]))
    with pytest.raises(HMCFormatError, match=r"1 labels disagree with the jsonl files \(train/00001: data 0, table 1\)"):
        check_confounders_cover(table, memes, "conf.parquet")


def test_caption_table_ids_normalized(tmp_path):
    path = tmp_path / "caps.parquet"
    pd.DataFrame({"image_id": [1456], "text": ["a"], "text_detailed": ["b"], "text_captioned": ["c"],
                  "text_detailed_captioned": ["d"]}).to_parquet(path)
    assert read_captions(path).image_id.tolist() == ["01456"]


@pytest.mark.parametrize("split", ["train", "dev_seen", "test_unseen"])
def test_zero_byte_split_is_an_error(tmp_path, split):
    path = tmp_path / f"{split}.jsonl"
    path.write_bytes(b"")
    with pytest.raises(HMCFormatError, match=rf"{split}\.jsonl: split '{split}' holds no memes \(the file is empty\)"):
        read_split(path)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_row(1).encode() + b"\n" + b'{"id": 2, "img": "img/2.png", "text": "caf\xe9", "label": 0}\n')
    with pytest.raises(HMCFormatError, match=r"train\.jsonl:2: byte b'\\xe9' at column \d+ is not UTF-8"):
        read_split(path)


@pytest.mark.parametrize("label", [True, False])
def test_boolean_label_is_rejected(tmp_path, label):
    path = _write(tmp_path / "train.jsonl", [_row(1), _row(7, label=label)])
    with pytest.raises(HMCFormatError, match=rf"train\.jsonl:2: id 00007: label {label} is not 0 or 1"):
        read_split(path)


def test_test_split_label_null_means_unlabeled(tmp_path):
    path = _write(tmp_path / "test_seen.jsonl", [_row(1, label=None), _row(2, label=1)])
    assert read_split(path).label.tolist() == [-1, 1]


def test_truncated_jpeg_fails_the_check_and_the_load_names_id_and_path(tmp_path):
    good = tmp_path / "img" / "00001.jpg"
    good.parent.mkdir()
    Image.effect_noise((64, 64), 60).convert("RGB").save(good, quality=90)
    data = good.read_bytes()
    cut = tmp_path / "img" / "00002.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with Image.open(cut) as im:  # the header check alone lets it through
        im.verify()
    frame = pd.DataFrame({"id": ["00001", "00002"], "img": ["img/00001.jpg", "img/00002.jpg"]})
    with pytest.raises(HMCFormatError, match=r"1 unreadable images \(ids 00002 \(.*00002\.jpg: OSError"):
        check_images(tmp_path, frame)
    with pytest.raises(HMCFormatError, match=r"meme 00002: image .*00002\.jpg cannot be decoded"):
        load_image(cut, "00002")


def test_caption_table_missing_the_chosen_column(tmp_path):
    path = tmp_path / "caps.parquet"
    pd.DataFrame({"image_id": ["00001"], "text": ["a picture"]}).to_parquet(path)
    with pytest.raises(HMCFormatError, match=r"caps\.parquet: missing columns \['text_captioned'\] \(has \['image_id', 'text'\]\)"):
        read_captions(path, ("text_captioned",))
    assert read_captions(path, ("text",)).text.tolist() == ["a picture"]  # only the columns in use are needed


def test_leakage_lists_ids_and_copied_memes():
    from memefx.data.hmc import leakage, leakage_message

    train = pd.DataFrame({"id": ["00001", "00002"], "text": ["a", "b"], "img": ["img/1.png", "img/2.png"]})
    dev = pd.DataFrame({"id": ["00001", "00003", "00004"], "text": ["a", "b", "c"],
                        "img": ["img/1.png", "img/2.png", "img/4.png"]})
    found = leakage(train, dev)
    assert found == {"ids": ["00001"], "text_img": ["00003"]}
    message = leakage_message("dev_seen", "train", found)
    assert "1 ids also in 'train' (00001)" in message and "1 memes whose exact (text, img) is a 'train' meme (00003)" in message
    assert leakage_message("dev_seen", "train", leakage(train, dev.iloc[2:])) is None


def test_windows_image_paths_and_the_path_tried_is_named(tiny_root, tmp_path):
    root = tmp_path / "hmc"
    shutil.copytree(tiny_root, root)
    rows = [json.loads(x) for x in (root / "dev_seen.jsonl").read_text().splitlines()]
    (root / "dev_seen.jsonl").write_text("".join(json.dumps({**r, "img": r["img"].replace("/", "\\")}) + "\n" for r in rows))
    frame = read_split(root / "dev_seen.jsonl")
    assert frame.img.iloc[0] == rows[0]["img"]  # img\00123.png read as img/00123.png
    check_images(root, frame)
    (root / "img" / f"{frame.id.iloc[0]}.png").unlink()
    with pytest.raises(HMCFormatError, match=rf"looked for {root}/img/{frame.id.iloc[0]}\.png\)"):
        check_images(root, frame)
