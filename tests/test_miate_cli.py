"""``memefx miate``: miATE of any predictions file, checked against a run's own result and plain pandas."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from memefx.causal.predictions import PredictionsError
from memefx.cli import main as memefx
from memefx.report.miate_cli import analyse, main

# dev_seen: shared-image group A (3 members: 1 hateful, 2 benign), group B (pair), group C (all benign: no
# stratum); shared-text group T (pair). test_seen: unlabeled, no strata.
TABLE = [
    ("00001", "dev_seen", 1, "00001", "Not hit"),
    ("00002", "dev_seen", 0, "00001", "No Confounder"),
    ("00003", "dev_seen", 0, "00001", "00005"),
    ("00004", "dev_seen", 1, "00004", "Not hit"),
    ("00005", "dev_seen", 0, "00004", "00005"),
    ("00006", "dev_seen", 0, "00006", "Not hit"),
    ("00007", "dev_seen", 0, "00006", "Not hit"),
    ("00008", "dev_seen", 1, "No Confounder", "00005"),
    ("00009", "test_seen", -1, "00009", "Not hit"),
]
SCORES = {"00001": 0.9, "00002": 0.2, "00003": 0.4, "00004": 0.7, "00005": 0.6, "00006": 0.1, "00007": 0.3,
          "00008": 0.8}


@pytest.fixture()
def table(tmp_path):
    path = tmp_path / "confounders.parquet"
    pd.DataFrame(TABLE, columns=["id", "split", "label", "img_org_id", "txt_org_id"]).to_parquet(path)
    return path


def _csv(tmp_path, scores=SCORES, name="scores.csv", **extra) -> str:
    frame = pd.DataFrame({"meme": list(scores), "score": list(scores.values()), **extra})
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def test_known_answer_labels_from_the_table(tmp_path, table):
    result = analyse(_csv(tmp_path), table, id_col="meme", score_col="score", n_bootstrap=200)
    assert result["split"] == "dev_seen" and result["labels_from_table"] == 8
    # A: 0.9 - mean(0.2, 0.4) = 0.6; B: 0.7 - 0.6 = 0.1; C is not a stratum
    image = result["shared_image"]
    assert image["n_strata"] == 2 and image["mean"] == pytest.approx(0.35)
    assert image["weighted_mean"] == pytest.approx((3 * 0.6 + 2 * 0.1) / 5)
    assert sorted(r["miate"] for r in image["strata"]) == pytest.approx([0.1, 0.6])
    # T (anchor 00005): hateful 00008 (0.8) vs benign 00003, 00005 (0.4, 0.6) = 0.3
    assert result["shared_text"]["mean"] == pytest.approx(0.3) and result["shared_text"]["n_strata"] == 1
    assert result["auroc"] == pytest.approx(1.0)  # every hateful score above every benign one here
    assert {"ci_low", "ci_high", "se", "placebo", "threshold_curve", "options", "skipped"} <= set(image)


def test_plain_pandas_agrees_on_real_sized_random_scores(tmp_path):
    """Random scores on a synthetic table with groups of 2 to 4: the mean per kind by plain pandas."""
    rng = np.random.default_rng(0)
    rows = []
    for g in range(60):
        size = int(rng.integers(2, 5))
        labels = [1] + [int(x) for x in rng.integers(0, 2, size - 1)]
        for k in range(size):
            rows.append((f"{1000 + len(rows):05d}", "dev_seen", labels[k], f"{g:05d}", "Not hit"))
    conf = pd.DataFrame(rows, columns=["id", "split", "label", "img_org_id", "txt_org_id"])
    conf.to_parquet(tmp_path / "c.parquet")
    preds = pd.DataFrame({"id": conf.id, "label": conf.label, "p_hateful": rng.random(len(conf))})
    preds.to_parquet(tmp_path / "p.parquet")
    result = analyse(tmp_path / "p.parquet", tmp_path / "c.parquet", split="dev_seen", n_bootstrap=100)
    merged = conf.merge(preds[["id", "p_hateful"]], on="id")
    per = merged.groupby(["img_org_id", "label"]).p_hateful.mean().unstack().dropna()
    assert result["shared_image"]["n_strata"] == len(per)
    assert result["shared_image"]["mean"] == pytest.approx(float((per[1] - per[0]).mean()), abs=1e-12)
    assert result["shared_text"]["n_strata"] == 0 and result["labels_from_table"] == 0


def test_matches_the_run_miate_json(tmp_path, tiny_root):
    """The same predictions give the same numbers as the run's own miate/<split>.json."""
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False, "enable_checkpointing": False, "limit_train_batches": 2,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"backbone": "caption_pair", "miate_bootstrap": 50, "lr": 0.003,
                  "backbone_args": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                    "intermediate_size": 64}},
        "data": {"root": str(tiny_root), "image_side": "caption", "caption_column": "text", "batch_size": 64,
                 "vocab_size": 512, "max_length": 32},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert memefx(["fit", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    own = json.loads((run / "miate" / "dev_seen.json").read_text())
    out = tmp_path / "out"
    assert main(["--predictions", str(run / "predictions" / "dev_seen.parquet"), "--confounders",
                 str(tiny_root / "confounders.parquet"), "--n-bootstrap", "50", "--out", str(out)]) == 0
    mine = json.loads((out / "dev_seen.json").read_text())
    for kind in ("shared_image", "shared_text"):
        assert own[kind]["n_strata"] > 0
        for key in ("n_strata", "n_members", "mean", "se", "ci_low", "ci_high", "weighted_mean"):
            assert mine[kind][key] == pytest.approx(own[kind][key], abs=1e-12), (kind, key)
        assert mine[kind]["placebo"] == pytest.approx(own[kind]["placebo"], abs=1e-12)
        assert [c["mean"] for c in mine[kind]["threshold_curve"]] == pytest.approx(
            [c["mean"] for c in own[kind]["threshold_curve"]], abs=1e-12)
        assert pd.DataFrame(mine[kind]["strata"]).equals(pd.DataFrame(own[kind]["strata"]))
    assert {p.name for p in out.iterdir()} >= {"dev_seen.json", "dev_seen_strata.csv", "dev_seen_strata.png"}
    assert len(pd.read_csv(out / "dev_seen_strata.csv")) == own["shared_image"]["n_strata"] + own["shared_text"]["n_strata"]


def test_command_dispatch_and_json(tmp_path, table, capsys):
    assert memefx(["miate", "--predictions", _csv(tmp_path), "--confounders", str(table), "--id-col", "meme",
                   "--score-col", "score", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["shared_image"]["mean"] == pytest.approx(0.35)


def test_a_file_of_several_splits_needs_split(tmp_path, table):
    scores = {**SCORES, "00009": 0.5}
    path = _csv(tmp_path, scores, split=["dev_seen"] * 8 + ["test_seen"])
    with pytest.raises(PredictionsError, match=r"several splits \['dev_seen', 'test_seen'\]: choose one with --split"):
        analyse(path, table, id_col="meme", score_col="score")
    assert analyse(path, table, split="dev_seen", id_col="meme", score_col="score")["n_predictions"] == 8
    unlabeled = analyse(path, table, split="test_seen", id_col="meme", score_col="score")
    assert unlabeled["n_labeled"] == 0 and unlabeled["shared_image"]["n_strata"] == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"00003": float("nan"), "00006": float("nan")}, r"2 memes have no score \(NaN\): ids 00003, 00006"),
    ({"00077": 0.5}, r"1 ids are not in split 'dev_seen' of .*confounders.parquet: 00077"),
    ({"00004": 1.5}, r"1 scores outside \[0, 1\] \(00004=1.5\)"),
])
def test_bad_scores_and_unknown_ids(tmp_path, table, change, message):
    with pytest.raises(PredictionsError, match=message):
        analyse(_csv(tmp_path, {**SCORES, **change}), table, split="dev_seen", id_col="meme", score_col="score")


def test_stratum_member_without_a_score(tmp_path, table):
    scores = {k: v for k, v in SCORES.items() if k not in ("00002", "00005")}
    with pytest.raises(PredictionsError, match=r"shared_image stratum members of 'dev_seen' have no prediction: "
                                               r"\['00002', '00005'\]"):
        analyse(_csv(tmp_path, scores), table, split="dev_seen", id_col="meme", score_col="score")


def test_duplicate_ids_missing_columns_and_label_clash(tmp_path, table):
    path = tmp_path / "dup.csv"
    pd.DataFrame({"id": ["1", "00001", "2"], "p_hateful": [0.1, 0.2, 0.3]}).to_csv(path, index=False)
    with pytest.raises(PredictionsError, match=r"1 ids appear more than once: 00001"):
        analyse(path, table)
    with pytest.raises(PredictionsError, match=r"no column \['prob'\] \(has \['id', 'p_hateful'\]\)"):
        analyse(path, table, score_col="prob")
    clash = tmp_path / "clash.csv"
    pd.DataFrame({"id": list(SCORES), "p_hateful": list(SCORES.values()),
                  "label": [0] + [None] * 7}).to_csv(clash, index=False)
    with pytest.raises(PredictionsError, match=r"1 labels disagree with .* \(00001: file 0, table 1\)"):
        analyse(clash, table)


def test_cli_error_is_one_line_exit_2(tmp_path, table, capsys):
    path = _csv(tmp_path, {**SCORES, "00008": float("nan")})
    assert memefx(["miate", "--predictions", path, "--confounders", str(table), "--id-col", "meme",
                   "--score-col", "score"]) == 2
    assert "1 memes have no score (NaN): ids 00008" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "write"), [
    ("scores.json", lambda f, p: f.to_json(p, orient="records", lines=True)),  # JSON lines in a .json
    ("scores.jsonl", lambda f, p: f.to_json(p, orient="records")),  # a JSON array in a .jsonl
    ("scores.txt", lambda f, p: f.to_csv(p, sep="\t", index=False)),  # TSV in a .txt
    ("scores.csv", lambda f, p: f.to_csv(p, sep=";", index=False)),  # semicolon CSV
])
def test_the_format_is_read_from_the_content(tmp_path, table, name, write):
    frame = pd.DataFrame({"meme": list(SCORES), "score": list(SCORES.values())})
    write(frame, tmp_path / name)
    result = analyse(tmp_path / name, table, id_col="meme", score_col="score", n_bootstrap=50)
    assert result["shared_image"]["mean"] == pytest.approx(0.35) and result["n_predictions"] == 8


def test_option_ranges_are_checked(tmp_path, table, capsys):
    base = ["miate", "--predictions", _csv(tmp_path), "--confounders", str(table), "--id-col", "meme", "--score-col", "score"]
    assert memefx([*base, "--threshold", "5"]) == 2
    assert "--threshold 5.0: a stratum's miATE lies in [-1, 1]" in capsys.readouterr().err
    assert memefx([*base, "--n-bootstrap", "-5"]) == 2
    assert "--n-bootstrap -5: expected a number of resamples >= 0" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"meme": "00001", "score": 0.9}\n{"meme": ')
    assert memefx(["miate", "--predictions", str(tmp_path / "broken.json"), "--confounders", str(table)]) == 2
    assert "neither JSON lines nor a JSON array of records" in capsys.readouterr().err


def test_json_output_is_strict_json(tmp_path, table, capsys):
    """An unlabeled split has no AUROC: written as null, never as a bare NaN token."""
    scores = {**SCORES, "00009": 0.5}
    path = _csv(tmp_path, scores, split=["dev_seen"] * 8 + ["test_seen"])
    assert memefx(["miate", "--predictions", path, "--confounders", str(table), "--id-col", "meme", "--score-col",
                   "score", "--split", "test_seen", "--json", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert strict["auroc"] is None
    json.loads((tmp_path / "out" / "test_seen.json").read_text(), parse_constant=lambda c: pytest.fail(c))
