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
    is_held_out,
    label_ceiling,
    pairs_in_prompt,
    parse_answer,
    parse_table,
    parser_inputs,
    rule_grid,
    split_labelled,
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


@pytest.mark.parametrize("answer,rules", [
    ("I will select the most likely hateful or sarcastic pair #1 using a model.", Rules()),  # a plan, no verdict
    ("caption #0 is the most likely to be hateful or sarcastic", Rules()),  # no label given
    ("\n* User: All pairs are benign.\n* System: All pairs are benign.", Rules()),  # role play of the dialogue
    # only the user's turn, when the reply is read from the System: turn after a written User: turn
    ("\nUser: Select a pair.\n\n(Note: keep in mind that all pairs are benign, so ...)",
     Rules(cut_turns=True, reply_after_user_turn=True)),
])
def test_non_answers(answer, rules):
    assert parse_answer(answer, n_pairs=2, rules=rules) == Verdict(False, False)


def test_a_role_played_turn_is_read_by_default_and_cut_when_asked():
    """The development answers' hand labels count a verdict the model writes inside its own role-played
    dialogue (cut_turns off, the choice on the development groups); cut_turns stops at the first turn."""
    answer = ("Let me help.\nUser: Yes please.\nSystem: Of the three pairs, pair #0 is the most likely, with the "
              "label 'sarcastic'.")
    assert parse_answer(answer, 3).pairs == ((0, S),)
    assert not parse_answer(answer, 3, Rules(cut_turns=True)).functional


def test_the_tasks_own_words_in_a_list_are_no_label():
    """A per-pair list that only restates "hateful or sarcastic" labels nothing; "not hateful or sarcastic"
    says benign."""
    listing = ("Ranked:\n#0: caption: 'a', image: 'b' (likelihood of being hateful or sarcastic: 0.8)\n"
               "#1: caption: 'c', image: 'd' (likelihood of being hateful or sarcastic: 0.4)")
    assert not parse_answer(listing, 2).functional
    labels = "Labels:\n* #0: Not hateful or sarcastic\n* #1: Hateful (derogatory)\n* #2: Sarcastic (dismissive)"
    assert parse_answer(labels, 3).pairs == ((0, "benign"), (1, H), (2, S))


def test_out_of_range_and_unknown_labels_mark_no_pair():
    out_of_range = "The most likely hateful or sarcastic pair is #2, with the potential label 'hateful'."
    assert parse_answer(out_of_range, n_pairs=2) == Verdict(False, False)  # a pair the prompt lacks: no verdict
    for answer, rules in ((out_of_range, Rules(out_of_range_functional=True)),
                          ("The most likely hateful or sarcastic pair is #1, with the potential label'sarcasm'.", Rules())):
        verdict = parse_answer(answer, n_pairs=2, rules=rules)
        assert verdict.functional and verdict.formatted and [verdict.label(p) for p in range(2)] == [None, None]
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


def test_pairs_in_prompt_counts_the_target_blocks_member_lines():
    from memefx.icl.prompts import Member, pair_prompt

    demo = [Member("x", "y", 1), Member("z", "w", 0), Member("u", "v", 0)]
    prompt = pair_prompt([Member("a #tag", "b"), Member("c", "d")], [demo])
    assert pairs_in_prompt(prompt) == 2  # the demonstration's 3 pairs and the '#' of "#tag" do not count
    inflated = prompt.replace("pairs #0 to #1,", "pairs #0 to #2,")  # the published header counts every '#'
    assert pairs_in_prompt(inflated) == 2
    assert pairs_in_prompt(None) is None and pairs_in_prompt("no prompt at all") is None


# --------------------------------------------------------------- agreement with the hand labels, held out
def test_the_held_out_groups_are_fixed_by_their_ids_alone():
    """The split is a hash of the group id (1456 and 01456 alike), so it cannot move with the file's rows."""
    assert is_held_out(1456) and is_held_out("01456") and is_held_out(1456.0) and not is_held_out(13809)
    answers = pd.read_csv(shared_file("llm_answers.csv"))
    development, held_out = split_labelled(answers)
    assert (development.image_id.nunique(), held_out.image_id.nunique()) == (34, 31)
    assert (len(development), len(held_out)) == (352, 329)
    assert not set(development.image_id) & set(held_out.image_id)
    reversed_rows = split_labelled(answers.iloc[::-1])[1]
    assert set(reversed_rows.index) == set(held_out.index)


@pytest.fixture(scope="module")
def labelled():
    answers = pd.read_csv(shared_file("llm_answers.csv")).drop_duplicates().reset_index(drop=True)
    return split_labelled(answers)


def test_default_rules_are_the_choice_on_the_development_groups(labelled):
    development, _ = labelled
    grid = rule_grid()
    assert grid[choose_rules(agreement_matrix(development, grid))] == Rules()


# measured on the held-out groups once the rules were final (benchmarks/parser_heldout.py --held-out):
# functional 0.9505, formatted 0.9164, hateful 0.9907, sarcastic 1.0000, benign 0.9598 (323 rows)
HELD_OUT_FLOOR = {"functional": 0.945, "formatted": 0.91, "hateful": 0.985, "sarcastic": 0.995, "benign": 0.955}


def test_parser_agrees_with_hand_labels_on_groups_not_used_to_choose_its_rules(labelled):
    """Agreement per field on the held-out groups, which no rule was written or chosen on, with the default
    rules (the development choice); each field also beats the development part's constant answer."""
    development, held_out = labelled
    parsed = parse_table(held_out)
    agreement = {f: float((parsed[f"is_{f}"].astype(int) == parsed[f"parsed_is_{f}"]).mean()) for f in FIELDS}
    assert all(agreement[f] >= HELD_OUT_FLOOR[f] for f in FIELDS), agreement
    constant = {f: float((held_out[f"is_{f}"] == int(development[f"is_{f}"].mean() >= 0.5)).mean()) for f in FIELDS}
    assert all(agreement[f] > constant[f] for f in FIELDS), (agreement, constant)


def test_label_ceiling_counts_inputs_the_parser_cannot_tell_apart():
    rows = pd.DataFrame({"ans_num": [0, 0, 0, 1], "generated_text": ["a", "a", "a", "a"], "prompt": None,
                         **{f"is_{f}": [1, 1, 0, 1] for f in FIELDS}})
    ceiling = label_ceiling(rows, parser_inputs(rows))
    assert ceiling["hateful"] == (1, 0.75)  # pair 0 of answer "a": labelled 1, 1, 0 -> at most 3 of 4 rows
    real = pd.read_csv(shared_file("llm_answers.csv")).drop_duplicates().reset_index(drop=True)
    assert label_ceiling(real, real[["generated_text", "ans_num"]])["hateful"] == (0, 1.0)
    assert label_ceiling(real, parser_inputs(real))["hateful"] == (1, pytest.approx(674 / 675))


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
