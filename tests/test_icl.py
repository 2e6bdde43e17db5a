"""LLM answer parsing and the per-shot table, against the hand labels and a plain pandas reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from memefx.cli import main
from memefx.icl.parse import (
    FIELDS,
    Rules,
    Verdict,
    agreement_matrix,
    choose_rules,
    pairs_in_prompt,
    parse_answer,
    parse_table,
    rule_grid,
)
from tests.conftest import shared_file

H, S = "hateful", "sarcastic"


@pytest.mark.parametrize("answer,pairs,others_benign", [
    ("\nAll pairs are benign.", (), True),
    ("\n\nThe most likely hateful or sarcastic pair is #1, with the potential label 'sarcastic'.", ((1, S),), True),
    (" The most likely hateful or sarcastic pair is #0, with the potential label 'hateful'.\nUser: next", ((0, H),), True),
    ("Both pairs are hateful. The first pair is more hateful.", ((0, H),), True),
    ("The most likely hateful or sarcastic pair is #1 and #3, with the potential label 'hateful'.", ((1, H), (3, H)), True),
    ("I'd say both #0 and #2 are likely hateful or sarcastic, with a potential label of 'sarcastic'.", ((0, S), (2, S)), True),
    ("The label for each pair is:\n#0: benign\n#1: hateful\n#2: sarcastic", ((0, "benign"), (1, H), (2, S)), True),
    ("\n\nUser: Which one?\n\nSystem: All pairs are benign.", (), True),  # the reply after a written User: turn
    ("The three image-caption pairs are all benign.", (), True),
])
def test_known_answers(answer, pairs, others_benign):
    verdict = parse_answer(answer, n_pairs=4)
    assert verdict.functional and verdict.formatted
    assert verdict.pairs == pairs and verdict.others_benign == others_benign


@pytest.mark.parametrize("answer", [
    "I will select the most likely hateful or sarcastic pair #1 using a model.",  # a plan, not a verdict
    "caption #0 is the most likely to be hateful or sarcastic",  # no label given
    "\n* User: All pairs are benign.\n* System: All pairs are benign.",  # role play of the dialogue
    "\nUser: Select a pair.\n\n(Note: keep in mind that all pairs are benign, so ...)",  # only the user's turn
])
def test_non_answers(answer):
    assert parse_answer(answer, n_pairs=2) == Verdict(False, False)


def test_out_of_range_and_unknown_labels_mark_no_pair():
    for answer in ("The most likely hateful or sarcastic pair is #2, with the potential label 'hateful'.",
                   "The most likely hateful or sarcastic pair is #1, with the potential label'sarcasm'."):
        verdict = parse_answer(answer, n_pairs=2)
        assert verdict.functional and verdict.formatted and [verdict.label(p) for p in range(2)] == [None, None]
    assert not parse_answer("pair #2 is hateful", 2, Rules(out_of_range_functional=False)).functional
    assert parse_answer("pair #1 is sarcasm", 2, Rules(sarcasm_is_label=True)).label(1) == S


def test_formatted_means_the_verdict_comes_first():
    late = "Let me think about this carefully. " * 5 + "All pairs are benign."
    assert parse_answer(late).functional and not parse_answer(late).formatted
    assert parse_answer(late, rules=Rules(opening=len(late))).formatted


def test_two_named_pairs_are_both_marked_in_the_table():
    answer = "The most likely hateful or sarcastic pair is #1 and #3, with the potential label 'hateful'."
    rows = pd.DataFrame({"ans_num": [0, 1, 2, 3], "generated_text": answer})
    parsed = parse_table(rows)
    assert parsed.parsed_is_hateful.tolist() == [0, 1, 0, 1] and parsed.parsed_is_benign.tolist() == [1, 0, 1, 0]
    echoed = rows.assign(prompt="User: Out of image-caption pairs #0 to #3, select ...\nSystem:")
    echoed["generated_text"] = echoed.prompt + answer  # a generated text that repeats its prompt
    assert parse_table(echoed).parsed_is_hateful.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("garbage", [None, float("nan"), "", "   ", "###", "#", "The most likely hateful or sarcastic pair is #",
                                     "\x00\ud7ff" * 50, "#" * 10_000, 42, ["a list"]])
def test_garbage_is_non_functional_never_an_error(garbage):
    verdict = parse_answer(garbage, n_pairs=2)
    assert not verdict.functional and verdict.pairs == () and verdict.label(0) is None


def test_pairs_in_prompt_reads_the_target_block():
    prompt = "User: Out of image-caption pairs #0 to #3, select ...\nSystem: ...\nUser: Out of image-caption pairs #0 to #1, ..."
    assert pairs_in_prompt(prompt) == 2 and pairs_in_prompt(None) is None


@pytest.fixture(scope="module")
def agreement():
    answers = pd.read_csv(shared_file("llm_answers.csv")).drop_duplicates().reset_index(drop=True)
    grid = rule_grid()
    return answers, grid, agreement_matrix(answers, grid)


def test_parser_agrees_with_hand_labels_on_groups_not_used_to_choose_its_rules(agreement):
    answers, grid, matrix = agreement
    groups = answers.image_id
    hits = {f: [] for f in FIELDS}
    for group in sorted(groups.unique()):  # leave one target group out: choose on the others, score it
        test = (groups == group).to_numpy()
        chosen = choose_rules(matrix, ~test)
        for f in FIELDS:
            hits[f].extend(matrix[(chosen, f)].to_numpy()[test])
    held_out = {f: float(np.mean(v)) for f, v in hits.items()}
    assert all(v >= 0.95 for v in held_out.values()), held_out
    majority = {f: max(answers[f"is_{f}"].mean(), 1 - answers[f"is_{f}"].mean()) for f in FIELDS}
    assert all(held_out[f] > majority[f] for f in FIELDS)  # better than a constant answer per field


def test_default_rules_are_the_choice_on_every_group(agreement):
    _, grid, matrix = agreement
    assert grid[choose_rules(matrix)] == Rules()


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
    marks = out.parsed_is_benign + out.parsed_is_hateful + out.parsed_is_sarcastic
    assert (marks <= out.parsed_is_functional).all()  # at most one verdict per pair, none when non-functional
    assert (marks == out.parsed_is_functional).mean() > 0.95  # functional answers without a valid verdict are rare
