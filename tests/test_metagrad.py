"""Meta-gradient: dual-form exactness, exact attention mass, demonstration spans known character by
character, and an analysis that separates features from prompt layout (the published form has its own
known-answer tests in test_metagrad_published.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from memefx.icl.metagrad import (
    CAPTION,
    CONTEXT,
    DEMO_ANSWER,
    DEMO_DESCRIPTION,
    DEMO_OTHER,
    DEMO_TEXT,
    IMAGE,
    OTHER,
    attention_mass,
    demo_char_groups,
    demo_groups,
    dual_form,
    span_labels,
    target_spans,
)
from memefx.icl.prompts import INSTRUCTION, Member, gold_answer, pair_prompt, parse_prompt
from tests.conftest import shared_file


def test_dual_form_reproduces_linear_attention_exactly():
    torch.manual_seed(0)
    length, d = 12, 6
    k, v, q = torch.randn(length, d, dtype=torch.float64), torch.randn(length, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2, -1, -1, -1, -1])
    out = dual_form(q, k, v, groups)
    linear_attention = (q @ k.T) @ v  # sum_j (q . k_j) v_j over every key
    assert torch.allclose(out["zsl"] + sum(out["delta"].values()), linear_attention, atol=1e-12)
    assert set(out["delta"]) == {0, 1, 2}
    assert torch.allclose(out["relative_norm"][1], out["delta"][1].norm(dim=-1) / out["zsl"].norm(dim=-1))


def test_attention_mass_of_a_hand_built_map():
    labels = torch.tensor([OTHER, CAPTION, CAPTION, IMAGE, IMAGE])
    att = torch.zeros(1, 5, 5)
    att[0, 1] = torch.tensor([0.0, 0.5, 0.25, 0.25, 0.0])  # caption query: 0.75 on captions, 0.25 on image
    att[0, 2] = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])  # caption query: 0.5 on captions, 0 on image
    att[0, 3] = torch.tensor([0.0, 0.1, 0.1, 0.8, 0.0])  # image query: 0.8 on image, 0.2 on captions
    att[0, 4] = torch.tensor([0.0, 0.0, 0.0, 0.4, 0.6])  # image query: 1.0 on image, 0 on captions
    mass = attention_mass(att, labels)
    assert torch.allclose(mass["caption_caption"], torch.tensor([0.625]))
    assert torch.allclose(mass["image_image"], torch.tensor([0.9]))
    assert torch.allclose(mass["cross"], torch.tensor([(0.25 + 0.0 + 0.2 + 0.0) / 4]))


def test_spans_on_real_prompts_match_their_pair_texts():
    from memefx.data.collate import train_wordpiece

    answers = pd.read_csv(shared_file("llm_answers.csv"))
    prompts = answers.prompt.drop_duplicates().head(25).tolist()
    tok = train_wordpiece(prompts, 3000)
    checked = 0
    for prompt in prompts:
        enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
        pairs = target_spans(prompt, enc["offset_mapping"])
        for pair in pairs:
            for kind in ("caption", "image"):
                start, end = pair[kind]
                decoded = tok.decode(enc["input_ids"][start:end]).replace(" ", "")
                expected = tok.decode(tok(pair[f"{kind}_text"], add_special_tokens=False)["input_ids"]).replace(" ", "")
                assert decoded == expected, (decoded, expected)
                checked += 1
        labels = span_labels(len(enc["input_ids"]), pairs)
        assert (labels == CAPTION).sum() > 0 and (labels == IMAGE).sum() > 0
        assert labels[: len(tok(prompt[: prompt.rfind("User:")], add_special_tokens=False)["input_ids"])].eq(OTHER).all()
    assert checked >= 100  # 25 prompts, both fields of every target pair


def _hand_built(k: int) -> tuple[str, list[int], list[Member]]:
    """A k-shot prompt assembled piece by piece with the group of every character written down as it is
    appended (independently of ``render``), plus the target members."""
    demos = [[Member(f"demo {d} text {j}", f"a photo {d}.{j}", label=int(j == d % 2)) for j in range(2 + d % 2)]
             for d in range(k)]
    target = [Member("target text zero", "target photo zero"), Member("target text one", "target photo one")]
    text, labels = [], []

    def put(piece: str, group: int) -> None:
        text.append(piece)
        labels.extend([group] * len(piece))

    blocks = [(d, gold_answer(d)) for d in demos] + [(target, None)]
    for b, (members, answer) in enumerate(blocks):
        is_target = b == len(blocks) - 1
        outside = CONTEXT if is_target else DEMO_OTHER
        if b == 0:
            put("User: " + INSTRUCTION.format(last=len(target) - 1), CONTEXT)
            put("\n", CONTEXT)
        else:
            put("User:\n", outside)
        for i, m in enumerate(members):
            put(f"#{i}: caption: '", outside)
            put(m.text, CONTEXT if is_target else DEMO_TEXT)
            put("', image: '", outside)
            put(m.description, CONTEXT if is_target else DEMO_DESCRIPTION)
            put("'" + ("\n" if i < len(members) - 1 else ""), outside)
        put("\nSystem:", outside)
        if answer is not None:
            put("\n\n", DEMO_OTHER)
            put(answer, DEMO_ANSWER)
            put("\n\n", DEMO_OTHER)
    return "".join(text), labels, target


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_demonstration_spans_known_character_by_character(k):
    prompt, expected, target = _hand_built(k)
    demos = [[Member(f"demo {d} text {j}", f"a photo {d}.{j}", label=int(j == d % 2)) for j in range(2 + d % 2)]
             for d in range(k)]
    assert prompt == pair_prompt(target, demos)  # the hand-built layout is the real one
    assert demo_char_groups(prompt) == expected
    # one token per character: token groups are the character groups
    assert demo_groups(prompt, [(i, i + 1) for i in range(len(prompt))]).tolist() == expected
    # every demonstration, the last one included, has exactly one answer span: its gold answer
    runs, start = [], None
    for i, g in enumerate([*expected, CONTEXT]):
        if g == DEMO_ANSWER and start is None:
            start = i
        elif g != DEMO_ANSWER and start is not None:
            runs.append(prompt[start:i])
            start = None
    assert runs == [gold_answer(d) for d in demos]


def test_straddling_tokens_take_their_content_group():
    prompt, expected, _ = _hand_built(1)
    answer_at = prompt.index(gold_answer([Member("demo 0 text 0", "", 1), Member("", "", 0)]))
    offsets = [(0, 5), (answer_at - 2, answer_at + 3), (answer_at + 3, answer_at + 3), (len(prompt) - 3, len(prompt))]
    assert demo_groups(prompt, offsets).tolist() == [CONTEXT, DEMO_ANSWER, CONTEXT, CONTEXT]


def test_demonstration_spans_on_real_prompts_decode_to_their_gold_answers():
    from memefx.data.collate import train_wordpiece

    answers = pd.read_csv(shared_file("llm_answers.csv"))
    prompts = answers[answers.few_shot_num > 0].drop_duplicates(["image_id", "few_shot_num"])
    tok = train_wordpiece(prompts.prompt.tolist(), 4000)

    def squash(text: str) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"]).replace(" ", "")

    checked = 0
    for row in prompts.itertuples():
        enc = tok(row.prompt, return_offsets_mapping=True, add_special_tokens=False)
        groups = demo_groups(row.prompt, enc["offset_mapping"]).tolist()
        blocks = parse_prompt(row.prompt)
        for group, wanted in ((DEMO_ANSWER, [b.answer for b in blocks[:-1]]),
                              (DEMO_TEXT, [m.text for b in blocks[:-1] for m in b.members]),
                              (DEMO_DESCRIPTION, [m.description for b in blocks[:-1] for m in b.members])):
            runs, start = [], None
            for t, g in enumerate([*groups, CONTEXT]):
                if g == group and start is None:
                    start = t
                elif g != group and start is not None:
                    runs.append(tok.decode(enc["input_ids"][start:t]).replace(" ", ""))
                    start = None
            assert runs == [squash(w) for w in wanted], (row.image_id, row.few_shot_num, group)
        assert groups.count(DEMO_ANSWER) > 0
        checked += 1
    assert checked == len(prompts) >= 180  # every 1- to 4-shot prompt of the shared answers


def _tiny_llama(tmp_path):
    from tests.test_engine import _save_llama

    return _save_llama(tmp_path / "llama", 32)


def test_hook_features_equal_an_unhooked_computation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memefx.icl.metagrad_features import prompt_features

    path = _tiny_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = pd.read_csv(shared_file("llm_answers.csv")).query("few_shot_num == 1").prompt.iloc[0]
    feats = prompt_features(model, tok, prompt)
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    offsets = [tuple(x) for x in enc.pop("offset_mapping")[0].tolist()]
    labels = span_labels(len(offsets), target_spans(prompt, offsets))
    with torch.no_grad():
        maps = model(input_ids=enc["input_ids"], output_attentions=True).attentions  # every L x L map, kept
    for layer, att in enumerate(maps):
        mass = attention_mass(att[0].float(), labels)
        for h in range(att.shape[1]):
            assert feats[f"L{layer}_H{h}_cross"] == pytest.approx(float(mass["cross"][h]), abs=1e-6)
    assert feats["L1_H0_dual_demo_text"] > 0  # a one-shot prompt has demonstration keys
    assert feats["L1_H0_dual_demo_answer"] > 0  # its (last and only) demonstration's answer is labelled


@pytest.mark.slow  # about 55 s
def test_run_metagrad_end_to_end_on_tiny_llama_both_forms(tmp_path):
    import importlib.util

    from memefx.icl.metagrad_report import run_metagrad

    has_extra = all(importlib.util.find_spec(m) for m in ("lightgbm", "optuna"))
    path = _tiny_llama(tmp_path)
    out = run_metagrad(shared_file("llm_answers.csv"), path, tmp_path / "mg", max_groups=5, features="both",
                       published_protocol=has_extra, n_bootstrap=20)
    features = pd.read_parquet(out / "features.parquet")
    assert features.groupby("image_id").few_shot_num.nunique().max() > 1
    assert {"L0_H0_caption_caption_zs", "L1_H3_cross_delta", "L0_H0_dual_demo_answer", "L0_P_cross_p0_delta",
            "L0_P_image_image_p171_zs", "layout_prompt_tokens", "layout_pairs"} <= set(features.columns)
    published = [c for c in features.columns if "_P_" in c]
    assert len(published) == 968 and not any(c.startswith("L1_P_") for c in published)  # layer 0 only
    zero = features[features.few_shot_num == 0]
    assert (zero.filter(regex=r"^L\d+_H\d+_.*_delta$") == 0).all().all()  # our zero-shot rows have no delta
    assert (zero.filter(like="_dual_") == 0).all().all()
    assert (zero.filter(regex=r"^L0_P_.*_delta$") != 0).any(axis=None)  # the published rows all carry delta_1
    assert (features.groupby("image_id")[published].nunique() == 1).all(axis=None)  # one vector per group
    shot = features[features.few_shot_num > 0]
    assert (shot.filter(like="dual_demo_answer") > 0).all().all()  # every demonstration's answer is seen
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["feature_sets"] == {"ours": analysis["feature_sets"]["ours"], "published": 968}
    report = (out / "report.md").read_text()
    first_table = report.index("| outcome | features | layout baseline AUC | layout + features AUC | gain [95% CI]")
    assert first_table < report.index("## Within each shot count") < report.index("## What the features add")
    assert "| is_formatted | published |" in report
    assert "importance.png" in report and (out / "importance.png").stat().st_size > 1000
    if has_extra:
        protocol = analysis["outcomes"]["is_formatted"]["sets"]["published"]["published_protocol"]
        assert protocol["scope_shots"] == [0, 1, 2] and protocol["rows"] < analysis["rows"]
        assert first_table < report.index("## The published protocol (row split") < report.index("## Within each")


@pytest.mark.slow
def test_metagrad_cli_takes_the_feature_form(tmp_path):
    from memefx.cli import main

    path = _tiny_llama(tmp_path)
    assert main(["icl", "metagrad", "--answers", str(shared_file("llm_answers.csv")), "--model", path,
                 "--out", str(tmp_path / "mg"), "--max-groups", "4", "--features", "published",
                 "--published-protocol", "false"]) == 0
    features = pd.read_parquet(tmp_path / "mg" / "features.parquet")
    assert any(c.startswith("L0_P_") for c in features.columns)
    assert not any(c.startswith("L0_H") for c in features.columns)


def _feature_table(mode: str, n_groups: int = 40, per: int = 2, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic (features, answers) shaped like the real ones: 0..3 shots per target group, delta features
    exactly 0 at zero shots and shifted with the shot count, layout columns growing with the shot count.

    ``shot``: outcomes depend on the shot count only (is_functional: 30% at 0 shots, always at k > 0;
    is_formatted: 25% / 80%). ``planted``: is_formatted depends on one feature within each shot
    (L1_H3_caption_caption_delta, whose scale and offset also change with the shot count)."""
    rng = np.random.default_rng(seed)
    feats, answers = [], []
    for g in range(n_groups):
        zs = rng.normal(size=3)
        for k in range(4):
            row = {"image_id": f"g{g}", "few_shot_num": k, "layout_prompt_tokens": 100 + 80 * k + int(rng.integers(0, 20)),
                   "layout_pairs": 2 + g % 3}
            for j in range(3):
                row[f"L0_H{j}_cross_zs"] = zs[j]
            for j in range(6):
                row[f"L{j % 2}_H{j}_image_image_delta"] = 0.0 if k == 0 else rng.normal(1 + k, 1)
            planted = rng.normal()
            row["L1_H3_caption_caption_delta"] = 0.0 if k == 0 else 2 * k + (1 + k) * planted
            feats.append(row)
            for _ in range(per):
                if mode == "shot":
                    functional = rng.random() < (0.3 if k == 0 else 1.0)
                    formatted = rng.random() < (0.25 if k == 0 else 0.8)
                else:
                    functional = rng.random() < 0.5
                    formatted = rng.random() < 1 / (1 + np.exp(-(3 * planted + (0.5 if k else -0.5))))
                answers.append({"image_id": f"g{g}", "few_shot_num": k, "is_functional": int(functional),
                                "is_formatted": int(formatted), "is_hateful": 1, "ground_truth": int(rng.random() < 0.5)})
    return pd.DataFrame(feats), pd.DataFrame(answers)


def test_gain_interval_covers_zero_when_only_the_shot_count_matters():
    from memefx.icl.metagrad_analysis import analyse

    features, answers = _feature_table("shot")
    result = analyse(features, answers, n_bootstrap=100, n_repeats=2, outcome_names=("is_functional", "is_formatted"))
    for outcome in ("is_functional", "is_formatted"):
        entry = result["outcomes"][outcome]
        ours = entry["sets"]["ours"]
        assert entry["baseline"]["auc"] > 0.65  # the layout alone predicts the outcome
        assert ours["alone_raw"]["grouped"] > 0.65  # so do raw features alone: the confound
        assert ours["ci_low"] <= 0 <= ours["ci_high"], ours  # but they add nothing beyond the layout
    within = result["outcomes"]["is_functional"]["sets"]["ours"]["within_shot"]
    assert "auc_features" in within[0]
    assert all("note" in within[k] and "fewer than" in within[k]["note"] for k in (1, 2, 3))  # all functional


def test_gain_is_positive_and_the_planted_feature_ranks_first():
    from memefx.icl.metagrad_analysis import analyse

    features, answers = _feature_table("planted")
    result = analyse(features, answers, n_bootstrap=100, n_repeats=2, outcome_names=("is_formatted",))
    ours = result["outcomes"]["is_formatted"]["sets"]["ours"]
    assert ours["ci_low"] > 0.1 and ours["gain"] > 0.2, ours
    assert next(iter(ours["top_features"])) == "L1_H3_caption_caption_delta"
    assert next(iter(ours["importance"])) == "caption_caption|delta|L1"
    for k in (1, 2, 3):
        assert ours["within_shot"][k]["ci_low"] > 0, ours["within_shot"][k]


def test_paired_gain_counts_pairs_within_folds_only():
    from memefx.icl.metagrad_analysis import paired_gain, stratified_auc

    y = np.array([1, 0, 1, 0])
    score = np.array([0.9, 0.8, 0.2, 0.1])  # perfect inside each fold, not across
    fold = np.array([0, 0, 1, 1])
    assert stratified_auc(y, score, fold) == 1.0
    result = paired_gain(y, np.zeros(4), score, np.array(["a", "a", "b", "b"]), fold, n_bootstrap=0)
    assert result["auc_baseline"] == 0.5 and result["auc_features"] == 1.0 and result["pairs"] == 2


def test_dual_form_batched_over_heads_equals_one_head_at_a_time():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 9, 5, dtype=torch.float64), torch.randn(3, 9, 5, dtype=torch.float64)
    groups = torch.tensor([3, 0, 0, 1, 2, 3, -1, -1, -1])
    positions = torch.tensor([5, 6, 7, 8])
    batched = dual_form(q, k, v, groups, positions)
    for h in range(3):
        single = dual_form(q[h], k[h], v[h], groups, positions)
        assert torch.allclose(batched["zsl"][h], single["zsl"])
        for g in single["delta"]:
            assert torch.allclose(batched["relative_norm"][g][h], single["relative_norm"][g])


def test_parsed_verdicts_stand_in_for_missing_hand_labels():
    """``memefx icl parse`` output of a new model's run has parsed_is_* and no hand labels: the analysis reads
    those (the README chain parse -> metagrad), hand labels win where both exist, and a table with neither
    is an error naming what is missing."""
    from memefx.icl.metagrad_analysis import outcome_columns, outcomes

    _, answers = _feature_table("shot", n_groups=4, per=1)
    parsed = answers.rename(columns={c: f"parsed_{c}" for c in ("is_functional", "is_formatted", "is_hateful")})
    pd.testing.assert_frame_equal(outcomes(parsed), outcomes(answers))
    both = answers.assign(parsed_is_functional=1 - answers.is_functional)
    assert outcome_columns(both)["is_functional"] == "is_functional"
    pd.testing.assert_frame_equal(outcomes(both), outcomes(answers))
    with pytest.raises(ValueError, match=r"lacks columns \['is_formatted \(or parsed_is_formatted\)'\]"):
        outcomes(answers.drop(columns="is_formatted"))
    unmapped = answers.assign(ground_truth=[-1] + answers.ground_truth.tolist()[1:])
    with pytest.raises(ValueError, match=r"1 answer rows have a ground_truth other than 0/1 \(first: image_id g0, 0-shot"):
        outcomes(unmapped)


def test_run_metagrad_refuses_a_table_without_outcomes_before_any_forward(tmp_path):
    from memefx.icl.metagrad_report import run_metagrad

    answers = pd.read_csv(shared_file("llm_answers.csv")).drop(columns=["is_functional"])
    path = tmp_path / "answers.csv"
    answers.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"answers.csv: answers table lacks columns \['is_functional"):
        run_metagrad(path, str(tmp_path / "no-model-needed"), tmp_path / "mg")
    assert not (tmp_path / "mg").exists()


def test_features_read_the_tokens_the_engine_answered_from_bos_first(tmp_path):
    """The engine starts every prompt with the tokenizer's BOS; the meta-gradient forward must see the same
    tokens, or a Llama's attention sink moves onto the first word and every mass changes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memefx.icl.engine import encode_prompt
    from memefx.icl.metagrad_features import prompt_record

    path = _tiny_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.bos_token = "[CLS]"
    prompt = pd.read_csv(shared_file("llm_answers.csv")).query("few_shot_num == 1").prompt.iloc[0]
    engine_ids = encode_prompt(tok, prompt)
    assert engine_ids[0] == tok.bos_token_id is not None
    record = prompt_record(model, tok, prompt)
    assert record["tokens"] == len(engine_ids)
    offsets = [(0, 0)] + [tuple(x) for x in tok(prompt, return_offsets_mapping=True,
                                                 add_special_tokens=False)["offset_mapping"]]
    labels = span_labels(len(offsets), target_spans(prompt, offsets))
    assert labels[0] == OTHER
    with torch.no_grad():
        maps = model(input_ids=torch.tensor([engine_ids]), output_attentions=True).attentions
    for layer, att in enumerate(maps):
        mass = attention_mass(att[0].float(), labels)
        for h in range(att.shape[1]):
            assert record["ours"][f"L{layer}_H{h}_image_image"] == pytest.approx(float(mass["image_image"][h]), abs=1e-6)


def test_features_table_names_the_row_of_a_prompt_it_cannot_read():
    from memefx.icl.metagrad_features import features_table

    rows = pd.DataFrame({"image_id": [7, 8], "few_shot_num": [0, 0],
                         "prompt": [pair_prompt([Member("a", "b"), Member("c", "d")]), "User: hello\nSystem:"]})
    with pytest.raises(ValueError, match=r"^image_id 8, 0-shot: not a pair-selection prompt"):
        features_table(rows.iloc[1:], model=None, tok=None)
    with pytest.raises(ValueError, match=r"^image_id 7, 0-shot: prompt is nan, not text"):
        features_table(rows.iloc[:1].assign(prompt=float("nan")), model=None, tok=None)


def test_report_says_how_many_resamples_gave_the_interval():
    from memefx.icl.metagrad_analysis import analyse
    from memefx.icl.metagrad_report import report_markdown

    features, answers = _feature_table("shot", n_groups=12, per=1)
    result = analyse(features, answers, n_bootstrap=10, n_repeats=1, outcome_names=("is_formatted",))
    entry = result["outcomes"]["is_formatted"]["sets"]["ours"]
    report = report_markdown(result)
    valid = entry["bootstrap_valid"]
    assert (f"({valid} of 10 resamples)" in report) == (valid < 10)
    entry["gain"], entry["bootstrap_valid"] = float("nan"), 3
    assert "| n/a [" in report_markdown(result) and "(3 of 10 resamples)" in report_markdown(result)
