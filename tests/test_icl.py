"""LLM answer parsing and the per-shot table, against the hand labels and a plain pandas reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from memefx.cli import main
from memefx.icl.parse import Verdict, pairs_in_prompt, parse_answer, parse_table
from tests.conftest import shared_file


@pytest.mark.parametrize("answer,expected", [
    ("\nAll pairs are benign.", Verdict(True, True, None, None)),
    ("\n\nThe most likely hateful or sarcastic pair is #1, with the potential label'sarcastic'.", Verdict(True, True, 1, "sarcastic")),
    (" The most likely hateful or sarcastic pair is #0, with the potential label 'hateful'.\nUser: next", Verdict(True, True, 0, "hateful")),
    ("Both pairs are hateful. The first pair is more hateful.", Verdict(True, True, 0, "hateful")),
    ("I will select the most likely hateful or sarcastic pair #1 using a model.", Verdict(False, False, None, None)),
    ("caption #0 is the most likely to be hateful or sarcastic", Verdict(False, False, None, None)),  # no label given
    ("\n* User: All pairs are benign.\n* System: All pairs are benign.", Verdict(False, False, None, None)),
])
def test_known_answers(answer, expected):
    assert parse_answer(answer, n_pairs=2) == expected


@pytest.mark.parametrize("garbage", [None, float("nan"), "", "   ", "###", "#", "The most likely hateful or sarcastic pair is #",
                                     "pair #7 is hateful", "\x00\ud7ff" * 50, "#" * 10_000, 42, ["a list"]])
def test_garbage_is_non_functional_never_an_error(garbage):
    verdict = parse_answer(garbage, n_pairs=2)
    assert not verdict.functional and verdict.selected is None


def test_pairs_in_prompt_reads_the_target_block():
    prompt = "User: Out of image-caption pairs #0 to #3, select ...\nSystem: ...\nUser: Out of image-caption pairs #0 to #1, ..."
    assert pairs_in_prompt(prompt) == 2 and pairs_in_prompt(None) is None


def test_parser_agrees_with_hand_labels():
    answers = pd.read_csv(shared_file("llm_answers.csv"))
    parsed = parse_table(answers)
    agreement = {f: (parsed[f"is_{f}"] == parsed[f"parsed_is_{f}"]).mean() for f in ("functional", "formatted", "hateful")}
    assert all(v >= 0.95 for v in agreement.values()), agreement


def _reference(answers: pd.DataFrame) -> dict:
    """The per-shot table computed directly with pandas, independently of memefx.icl.metrics."""
    def score(pred, y):
        return {"n": len(pred), "accuracy": float((pred == y).mean()),
                "ate": float(pred[y == 1].mean() - pred[y == 0].mean())}

    out = {}
    groups = [(f"{k}_shot", g) for k, g in answers.groupby("few_shot_num")] + [("few_shot_pooled", answers[answers.few_shot_num > 0])]
    for name, g in groups:
        y = g.ground_truth
        entry = {"n": len(g)}
        for target in ("is_hateful", "is_hateful_or_sarcastic"):
            pred = g[target]
            ok = g.is_functional == 1
            entry[target] = {"all": score(pred, y), "ttc_flipped": score(np.where(ok, pred, 1 - y), y.to_numpy()),
                             "functional_only": score(pred[ok], y[ok])}
        out[name] = entry
    return out


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_table_cli_equals_pandas_reference(capsys):
    path = shared_file("llm_answers.csv")
    assert main(["icl", "table", "--answers", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert _close(got, json.loads(json.dumps(_reference(pd.read_csv(path)))))


def test_parse_cli_writes_verdicts(tmp_path, capsys):
    path = shared_file("llm_answers.csv")
    assert main(["icl", "parse", "--answers", str(path), "--out", str(tmp_path / "p.parquet")]) == 0
    report = json.loads(capsys.readouterr().out)
    out = pd.read_parquet(tmp_path / "p.parquet")
    assert report["rows"] == len(out) == 681
    assert {"parsed_is_functional", "parsed_is_formatted", "parsed_is_hateful", "parsed_is_sarcastic",
            "parsed_is_benign"} <= set(out.columns)
    assert ((out.parsed_is_benign + out.parsed_is_hateful + out.parsed_is_sarcastic) == out.parsed_is_functional).all()
