"""The README chain ``icl prompts -> icl run -> icl parse -> icl table`` in-process on a tiny random Llama
(CPU), and the per-meme score run feeding miATE and AUROC."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from memefx.cli import main
from memefx.icl.answers import expand_answers
from memefx.icl.engine import UserError
from tests.test_engine import _save_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("chain_llama"), 32)


def _labels(root) -> dict[str, int]:
    memes = pd.read_json(root / "dev_seen.jsonl", lines=True, dtype={"id": str})
    return dict(zip(memes.id, memes.label.astype(int)))


def _gold(labels: list[int]) -> str:
    hateful = [f"#{i}" for i, y in enumerate(labels) if y == 1]
    return (f"The most likely hateful or sarcastic pair is {' and '.join(hateful)}, with the potential label "
            "'hateful'." if hateful else "All pairs are benign.")


def test_readme_chain_end_to_end(tiny_root, llama, tmp_path, capsys):
    p, a, parsed = tmp_path / "prompts.parquet", tmp_path / "answers.parquet", tmp_path / "parsed.parquet"
    conf, caps = tiny_root / "confounders.parquet", tiny_root / "hm_captions.parquet"
    assert main(["icl", "prompts", "--confounders", str(conf), "--captions", str(caps), "--hmc", str(tiny_root),
                 "--split", "dev_seen", "--shots", "0,1", "--out", str(p)]) == 0
    prompts = pd.read_parquet(p)
    assert len(prompts) > 4 and set(prompts.few_shot_num) == {0, 1}
    assert main(["icl", "run", "--prompts", str(p), "--engine.model", llama, "--engine.max_new_tokens", "6",
                 "--engine.batch_size", "4", "--cache", str(tmp_path / "cache"), "--out", str(a)]) == 0
    run = pd.read_parquet(a)
    assert set(prompts.columns) < set(run.columns) and run.generated_text.map(type).eq(str).all()
    pd.testing.assert_frame_equal(run[prompts.columns], prompts)  # carried through, in order
    capsys.readouterr()
    assert main(["icl", "parse", "--answers", str(a), "--out", str(parsed)]) == 0
    rows = pd.read_parquet(parsed)
    assert len(rows) == sum(len(ids) for ids in prompts.member_ids)
    labels = _labels(tiny_root)
    assert (rows.ground_truth == rows.id.map(labels)).all()  # every pair is its meme, with its gold label
    assert (rows.groupby(["image_id", "few_shot_num"]).ans_num.agg(list)
            .map(lambda n: n == list(range(len(n))))).all()
    assert {"parsed_is_functional", "parsed_is_hateful", "parsed_is_benign"} <= set(rows.columns)
    capsys.readouterr()
    assert main(["icl", "table", "--answers", str(parsed), "--parsed", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {k: v["n"] for k, v in table.items()} == {"0_shot": int((rows.few_shot_num == 0).sum()),
                                                     "1_shot": int((rows.few_shot_num == 1).sum()),
                                                     "few_shot_pooled": int((rows.few_shot_num == 1).sum())}

    # the same chain with answers planted: the gold answer of every prompt, and the gold answer shifted by one pair
    for shift, accuracy in ((0, 1.0), (1, None)):
        planted = run.copy()
        planted["generated_text"] = [_gold(list(np.roll(ls, shift))) for ls in run.member_labels]
        planted.to_parquet(tmp_path / "planted.parquet")
        assert main(["icl", "table", "--answers", str(tmp_path / "planted.parquet"), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["0_shot"]["is_hateful"]["all"]
        expected = expand_answers(planted)
        expected = expected[expected.few_shot_num == 0]
        truth = expected.ground_truth.to_numpy()
        pred = np.concatenate([np.roll(ls, shift) for ls in run[run.few_shot_num == 0].member_labels])
        assert got["accuracy"] == pytest.approx(float((pred == truth).mean()))
        assert got["ate"] == pytest.approx(float(pred[truth == 1].mean() - pred[truth == 0].mean()))
        if accuracy is not None:
            assert got["accuracy"] == accuracy and got["ate"] == 1.0


def test_an_answer_naming_two_pairs_marks_both():
    from memefx.icl.parse import parse_table
    from memefx.icl.prompts import Member, pair_prompt

    prompt = pair_prompt([Member(f"text {i}", f"picture {i}") for i in range(4)])
    run = pd.DataFrame({"group": ["07"], "few_shot_num": [0], "prompt": [prompt], "member_ids": [["a", "b", "c", "d"]],
                        "member_labels": [[0, 1, 0, 1]],
                        "generated_text": ["The most likely hateful or sarcastic pairs are #1 and #3, both 'hateful'."]})
    parsed = parse_table(expand_answers(run), "generated_text")
    assert parsed.parsed_is_hateful.tolist() == [0, 1, 0, 1] and parsed.parsed_is_benign.tolist() == [1, 0, 1, 0]


def test_malformed_run_output_is_a_clear_error(tmp_path, capsys):
    from memefx.icl.prompts import Member, pair_prompt

    prompt = pair_prompt([Member("a", "b"), Member("c", "d")])
    bad = pd.DataFrame({"group": ["07"], "few_shot_num": [0], "prompt": [prompt], "member_ids": [["x", "y", "z"]],
                        "member_labels": [[0, 1, 0]], "generated_text": ["All pairs are benign."]})
    with pytest.raises(UserError, match=r"row 0 \(group '07', 0-shot\): 3 member ids, 3 labels, 2 member lines"):
        expand_answers(bad)
    score_run = bad.drop(columns=["generated_text"]).assign(p_hateful=0.5)
    with pytest.raises(UserError, match="--mode score run gives p_hateful"):
        expand_answers(score_run)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("image_id,few_shot_num,ans_num,ground_truth,is_functional,is_hateful,is_sarcastic\n")
    assert main(["icl", "table", "--answers", str(header_only)]) == 2
    assert capsys.readouterr().err.strip() == "memefx icl table: answers table has no rows"
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    assert main(["icl", "table", "--answers", str(blank)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_per_meme_scores_are_predictions_for_miate_and_auroc(tiny_root, llama, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    from memefx.causal.miate import miate_from_predictions
    from memefx.data.strata import strata_members
    from memefx.data.tables import read_confounders

    p, out = tmp_path / "memes.parquet", tmp_path / "scores.parquet"
    conf, caps = tiny_root / "confounders.parquet", tiny_root / "hm_captions.parquet"
    assert main(["icl", "prompts", "--confounders", str(conf), "--captions", str(caps), "--hmc", str(tiny_root),
                 "--per-meme", "--out", str(p)]) == 0
    capsys.readouterr()
    assert main(["icl", "run", "--prompts", str(p), "--engine.model", llama, "--mode", "score",
                 "--cache", str(tmp_path / "c"), "--out", str(out)]) == 0
    scores = pd.read_parquet(out)
    assert scores.id.map(type).eq(str).all() and scores.p_hateful.between(0, 1).all()
    auroc = roc_auc_score(scores.label, scores.p_hateful)
    assert f"AUROC(p_hateful) = {auroc:.4f}" in capsys.readouterr().out
    members = strata_members(read_confounders(conf))
    result = miate_from_predictions(scores[["id", "label", "p_hateful"]], members, "shared_image", "dev_seen",
                                    n_bootstrap=50)
    # reference: per stratum, mean p over hateful members minus mean p over benign members, then the mean
    rows = members[(members.kind == "shared_image") & (members.split == "dev_seen")].merge(
        scores[["id", "p_hateful"]], on="id")
    per = [g[g.label == 1].p_hateful.mean() - g[g.label == 0].p_hateful.mean() for _, g in rows.groupby("anchor")]
    assert len(per) > 2 and result["mean"] == pytest.approx(float(np.mean(per)), abs=1e-9)
    capsys.readouterr()  # `memefx miate` reads the score run's output as it is, both kinds
    assert main(["miate", "--predictions", str(out), "--confounders", str(conf), "--split", "dev_seen", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shared_image"]["mean"] == pytest.approx(float(np.mean(per)), abs=1e-9)
    assert report["auroc"] == pytest.approx(auroc) and report["shared_text"]["n_strata"] > 0


def test_every_icl_option_comes_from_a_typed_signature(capsys):
    """Each subcommand's flags are exactly the parameters of the functions it calls (dataclass fields nested):
    nothing written twice, nothing missing; the spellings users type map onto them."""
    import inspect

    from memefx.icl.cli import _normalize, _option_types, build_parser, commands, schema

    parser = build_parser()
    for name in commands():
        sub = parser._subcommands_action._name_parser_map[name]
        flags = {a.dest for a in sub._actions if a.dest not in ("help", "config", "print_config")}
        expected = {k for source in schema(name) for k in _option_types(source)}
        nested = {k.split(".")[0] for k in expected if "." in k}  # a dataclass group also takes a whole config
        assert flags - nested == expected, name
        for source in schema(name):
            assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(source).parameters.values())
    types = {k: v for source in schema("prompts") for k, v in _option_types(source).items()}
    assert _normalize(["--per-meme", "--shots", "0,2", "--char-cap=900", "--out", "x"], types) == [
        "--per_meme=true", "--shots=[0, 2]", "--char_cap=900", "--out=x"]
    with pytest.raises(SystemExit):
        build_parser(["run"]).parse_args(["run", "--prompts", "p", "--cache", "c", "--out", "o",
                                          "--engine.model", "m", "--engine.no_such_flag", "1"])


def test_table_refuses_pairs_without_a_gold_label(tmp_path, capsys):
    """A replayed pair that maps to no meme carries ground_truth -1: scoring it would count a wrong answer."""
    from memefx.icl.prompts import Member, pair_prompt

    prompt = pair_prompt([Member("a", "b"), Member("c", "d")])
    run = pd.DataFrame({"group": ["07", "08"], "few_shot_num": [0, 0], "prompt": [prompt] * 2,
                        "member_ids": [["x", "y"], ["", "z"]], "member_labels": [[0, 1], [-1, 1]],
                        "generated_text": ["All pairs are benign."] * 2})
    run.to_parquet(tmp_path / "run.parquet")
    assert main(["icl", "table", "--answers", str(tmp_path / "run.parquet")]) == 2
    err = capsys.readouterr().err
    assert "1 answer rows have a ground_truth other than 0/1 (first: image_id 08, 0-shot, pair #0, ground_truth -1)" in err
    run.iloc[:1].to_parquet(tmp_path / "labeled.parquet")
    assert main(["icl", "table", "--answers", str(tmp_path / "labeled.parquet")]) == 0


def test_prompts_cli_reports_prompts_dropped_by_the_character_cap(tiny_root, tmp_path, capsys):
    conf, caps = tiny_root / "confounders.parquet", tiny_root / "hm_captions.parquet"
    out = tmp_path / "published.parquet"
    args = ["icl", "prompts", "--layout", "published", "--confounders", str(conf), "--captions", str(caps),
            "--hmc", str(tiny_root), "--shots", "0,1,2", "--out", str(out)]
    assert main([*args, "--char-cap", "100000"]) == 0
    everything = pd.read_parquet(out)
    capsys.readouterr()
    cap = int(everything.prompt.str.len().median())
    assert main([*args, "--char-cap", str(cap)]) == 0
    kept = pd.read_parquet(out)
    dropped = {k: int(((everything.few_shot_num == k) & (everything.prompt.str.len() > cap)).sum()) for k in (0, 1, 2)}
    assert sum(dropped.values()) == len(everything) - len(kept) > 0
    assert f"{sum(dropped.values())} prompts over the character cap dropped (per shot count: {dropped})" in \
        capsys.readouterr().out


# ------------------------------------------------------------------- published-layout prompts the header miscounts
_HEAD = ("User: Out of image-caption pairs #0 to #{last}, select the most likely hateful or sarcastic pair, together "
         "with potential label (hateful or sarcastic). If all pairs are benign, say 'All pairs are benign'.\n")
_DEMO = ("#0: caption: 'a #tag and a #hashtag', image: 'a dog'\n#1: caption: 'plain words', image: 'a cat'\nSystem:\n\n"
         "The most likely hateful or sarcastic pair is #1, with the potential label 'hateful'.\n\nUser:\n")
_TARGET = "#0: caption: 'love is love #pride', image: 'a rainbow flag'\n#1: caption: 'they are all the same', image: 'a flag'"


def _hash_prompts() -> list[str]:
    """A target whose meme text holds '#': the authors' header counts every '#' of the zero-shot prompt
    (#0, #pride, #1 -> "#0 to #2") over 2 pairs; the 1-shot prompt adds a demonstration holding '#' too."""
    zero = _TARGET + "\nSystem:"
    return [_HEAD.format(last=2) + zero, _HEAD.format(last=2) + _DEMO + zero]


def test_hand_made_prompts_are_what_the_published_procedure_writes():
    from memefx.icl.published import _target_prompts

    lines = ["caption: 'a #tag and a #hashtag', image: 'a dog'", "caption: 'plain words', image: 'a cat'",
             "caption: 'love is love #pride', image: 'a rainbow flag'", "caption: 'they are all the same', image: 'a flag'"]
    got = _target_prompts(lines, [0, 1, 0, 1], [np.array([0, 1]), np.array([2, 3])], np.array([2, 3]), 1)
    assert got == _hash_prompts()
    empty = _target_prompts(lines, [0, 1, 0, 1], [np.array([0, 1]), np.array([], dtype=int)], np.array([], dtype=int), 1)
    assert empty == [_HEAD.format(last=-1) + "\nSystem:", _HEAD.format(last=-1) + _DEMO + "\nSystem:"]


def test_a_meme_text_holding_hash_does_not_break_parse(tmp_path, capsys):
    """The header says "#0 to #2" over 2 pairs: the target block's member lines are counted instead, so a
    published-layout run parses (it was refused: "2 member ids ... 3 pairs")."""
    from memefx.icl.parse import pairs_in_prompt

    prompts = _hash_prompts()
    assert [pairs_in_prompt(p) for p in prompts] == [2, 2]
    run = pd.DataFrame({"group": ["15049", "15049"], "few_shot_num": [0, 1], "prompt": prompts,
                        "member_ids": [["11", "12"]] * 2, "member_labels": [[0, 1]] * 2,
                        "generated_text": ["The most likely hateful or sarcastic pair is #1, with the potential label "
                                           "'hateful'."] * 2})
    rows = expand_answers(run)
    assert rows[["few_shot_num", "ans_num", "id"]].values.tolist() == [[0, 0, "11"], [0, 1, "12"], [1, 0, "11"],
                                                                      [1, 1, "12"]]
    run.to_parquet(tmp_path / "run.parquet")
    assert main(["icl", "parse", "--answers", str(tmp_path / "run.parquet"), "--out", str(tmp_path / "p.parquet")]) == 0
    parsed = pd.read_parquet(tmp_path / "p.parquet")
    assert parsed.parsed_is_hateful.tolist() == [0, 1, 0, 1]
    wrong = run.assign(member_ids=[["11", "12", "13"]] * 2, member_labels=[[0, 1, 0]] * 2)
    with pytest.raises(UserError, match="3 member ids, 3 labels, 2 member lines"):  # still checked, by the lines
        expand_answers(wrong)


def test_prompts_of_a_target_without_pairs_are_reported_never_dropped_silently(tmp_path, capsys):
    """A target whose member lines all sit in other groups keeps its prompts (header "#0 to #-1", no member
    ids, as the authors' procedure writes them); parse and table leave them out and say so."""
    empty = [_HEAD.format(last=-1) + "\nSystem:", _HEAD.format(last=-1) + _DEMO + "\nSystem:"]
    prompts = _hash_prompts() + empty
    run = pd.DataFrame({"group": ["15049", "15049", "61458", "61458"], "few_shot_num": [0, 1, 0, 1],
                        "prompt": prompts, "member_ids": [["11", "12"], ["11", "12"], [], []],
                        "member_labels": [[0, 1], [0, 1], [], []], "generated_text": ["All pairs are benign."] * 4})
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) have no pair of their own .*group 61458, 0-shot; "
                                         r"group 61458, 1-shot"):
        rows = expand_answers(run)
    assert len(rows) == 4 and rows.attrs["no_pairs"] == ["group 61458, 0-shot", "group 61458, 1-shot"]
    run.to_parquet(tmp_path / "run.parquet")
    capsys.readouterr()
    assert main(["icl", "parse", "--answers", str(tmp_path / "run.parquet"), "--out", str(tmp_path / "p.parquet")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 4 and report["prompts_without_pairs"] == ["group 61458, 0-shot", "group 61458, 1-shot"]
    assert main(["icl", "table", "--answers", str(tmp_path / "run.parquet")]) == 0
    assert "not counted: 2 prompt(s) have no pair of their own" in capsys.readouterr().out
    assert main(["icl", "table", "--answers", str(tmp_path / "run.parquet"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["0_shot"]["n"] == 2 and "2 prompt(s) have no pair of their own" in out.err


def test_prompts_cli_names_prompts_without_pairs(monkeypatch, tmp_path, capsys):
    """`icl prompts` says which prompts have no pair of their own, before any GPU time is spent on them."""
    import memefx.icl.prompts as prompts_module

    table = pd.DataFrame({"group": ["15049", "61458", "61458"], "few_shot_num": [0, 0, 1],
                          "prompt": [*_hash_prompts()[:1], _HEAD.format(last=-1) + "\nSystem:",
                                     _HEAD.format(last=-1) + _DEMO + "\nSystem:"],
                          "member_ids": [["11", "12"], [], []], "member_labels": [[0, 1], [], []]})
    import functools

    @functools.wraps(prompts_module.build_prompts)  # the real signature: the CLI's schema
    def fake(**options):
        return table

    monkeypatch.setattr(prompts_module, "build_prompts", fake)
    assert main(["icl", "prompts", "--captions", "c.parquet", "--out", str(tmp_path / "p.parquet")]) == 0
    assert "2 prompts have no pair of their own (group 61458, 0-shot; group 61458, 1-shot)" in capsys.readouterr().out
