"""The published prompt set: the authors' procedure byte for byte (numpy 1.23's quicksort included), and the
replay of the shared prompts."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from memefx.icl import npsort
from memefx.icl.npsort import argsort_numpy123
from memefx.icl.parse import pairs_in_prompt
from memefx.icl.prompts import PromptInputError as UserError
from memefx.icl.prompts import build_prompts, parse_prompt
from memefx.icl.published import (
    TARGET_RANK,
    group_ranks,
    published_groups,
    published_prompt_table,
    replay_published,
)
from tests.conftest import shared_file


def _data() -> dict:
    return {"confounders": shared_file("confounders.parquet"), "captions": shared_file("hm_captions.parquet"),
            "hmc": shared_file("hmc/dev_seen.jsonl").parent}


def _build(**kwargs) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*duplicate rows", category=UserWarning)
        return build_prompts(**_data(), **kwargs)


def _pairs(prompt: str, block: int = -1) -> list[str]:
    return sorted(f"{m.text}\x00{m.description}" for m in parse_prompt(prompt)[block].members)


@pytest.fixture(scope="module")
def published() -> pd.DataFrame:
    return pd.read_csv(shared_file("llm_answers.csv"))


@pytest.fixture(scope="module")
def procedure() -> pd.DataFrame:
    return _build(layout="published")


def test_replay_rebuilds_every_shared_prompt_and_maps_every_pair(published):
    table = _build(from_published=shared_file("llm_answers.csv"))
    assert len(table) == published.prompt.nunique() == 247
    assert table.unmapped.map(len).sum() == 0, table.unmapped[table.unmapped.map(len) > 0].tolist()[:3]
    assert table.rebuilt.all()  # every prompt re-rendered from its memes equals the published text
    assert set(table.prompt) == set(published.prompt)
    truth = {(f"{g:05d}", k, n): y for g, k, n, y in
             zip(published.image_id, published.few_shot_num, published.ans_num, published.ground_truth)}
    hmc = pd.read_json(_data()["hmc"] / "dev_seen.jsonl", lines=True, dtype={"id": str})
    label_of = dict(zip(hmc.id, hmc.label))
    for row in table.itertuples():
        assert len(row.member_ids) == len(row.member_labels) == pairs_in_prompt(row.prompt)
        assert all(label_of[i] == y for i, y in zip(row.member_ids, row.member_labels))
        for n, y in enumerate(row.member_labels):  # the published per-pair ground truth, where the file has the row
            assert truth.get((row.group, row.few_shot_num, n), y) == y
        assert len(row.demo_groups) == row.few_shot_num and row.group not in row.demo_groups and all(row.demo_groups)


def test_replay_lists_pairs_it_cannot_map(published, tmp_path):
    bad = published.copy()
    first = bad.prompt.iloc[0]
    changed = first.replace("he made millions of children homeless", "a text no meme has")
    assert changed != first
    bad.loc[bad.prompt == first, "prompt"] = changed
    path = tmp_path / "answers.csv"
    bad.to_csv(path, index=False)
    table = _build(from_published=path)
    row = table[table.prompt == changed].iloc[0]
    assert not row.rebuilt and row.member_ids[0] == "" and row.member_labels[0] == -1
    assert len(row.unmapped) == 1 and "target pair #0: no meme has this text" in row.unmapped[0]
    assert table[table.prompt != changed].rebuilt.all()


def test_replay_never_guesses_between_identical_memes():
    prompt = ("User: Out of image-caption pairs #0 to #1, select the most likely hateful or sarcastic pair, together "
              "with potential label (hateful or sarcastic). If all pairs are benign, say 'All pairs are benign'.\n"
              "#0: caption: 'same words', image: 'same picture'\n#1: caption: 'other', image: 'thing'\nSystem:")
    texts = {"00001": "same words", "00002": "same words", "00003": "other"}
    descriptions = {"00001": "same picture", "00002": "same picture", "00003": "thing"}
    labels = {"00001": 1, "00002": 0, "00003": 0}
    answers = pd.DataFrame({"image_id": [3], "few_shot_num": [0], "prompt": [prompt]})
    row = replay_published(answers, texts, descriptions, labels).iloc[0]
    assert row.member_ids == ["", "00003"] and row.member_labels == [-1, 0] and not row.rebuilt
    assert "2 memes match (ids 00001, 00002)" in row.unmapped[0]
    with pytest.raises(UserError, match="lacks columns"):
        replay_published(answers.drop(columns="prompt"), texts, descriptions, labels)
    with pytest.raises(UserError, match=r"row 0 \(group 00003, 0-shot\): prompt is nan, not text"):
        replay_published(answers.assign(prompt=float("nan")), texts, descriptions, labels)
    with pytest.raises(UserError, match="row 0 .*: not a pair-selection prompt"):
        replay_published(answers.assign(prompt="User: hello\nSystem:"), texts, descriptions, labels)


def test_procedure_rebuilds_every_published_prompt_with_seed_1987(procedure, published):
    assert procedure.group.nunique() == 97  # the published run's dev_seen target groups
    assert procedure.groupby("few_shot_num").size().tolist() == [97, 97, 97, 73, 7]  # the published counts
    assert procedure.attrs["dropped"] == {0: 0, 1: 0, 2: 0, 3: 24, 4: 90}  # over 2,000 characters
    ours = procedure.set_index(["group", "few_shot_num"])
    shared = published.drop_duplicates(["image_id", "few_shot_num"])
    assert len(shared) == 247
    for group, shots, prompt in zip(shared.image_id, shared.few_shot_num, shared.prompt):
        assert ours.loc[(f"{group:05d}", shots), "prompt"] == prompt, (group, shots)  # byte for byte
    for group, shots, pair, truth in zip(published.image_id, published.few_shot_num, published.ans_num,
                                         published.ground_truth):
        assert ours.loc[(f"{group:05d}", shots), "member_labels"][pair] == truth  # same memes, same order
    zero = procedure[procedure.few_shot_num == 0].set_index("group")
    for row in zero.itertuples():
        assert len(row.member_ids) == pairs_in_prompt(row.prompt) == len(set(row.member_ids))
    # a target keeps both labels unless a member's line duplicates a kept one (published: dropped, as here)
    one_label = zero[zero.member_labels.map(lambda x: len(set(x)) < 2)]
    assert one_label.index.tolist() == ["43810"]  # its benign member 56124 has the hateful anchor's exact line


def test_procedure_equals_the_authors_script_on_dev_seen_seed_7():
    """The authors' script, unmodified, under numpy 1.23.5 / pandas 1.5.3: every prompt, and the cap's set."""
    oracle = pd.read_csv(shared_file("authors_prompts_dev_seen_seed7.csv"), dtype={"group": str})
    oracle["group"] = oracle.group.str.zfill(5)
    ours = _build(layout="published", seed=7, char_cap=10**9)  # no cap
    both = oracle.merge(ours, on=["group", "few_shot_num"], how="outer", suffixes=("_authors", ""), indicator=True)
    assert len(oracle) == 485 and (both._merge == "both").all()
    assert (both.prompt == both.prompt_authors).sum() == 485
    assert (both.group_dir == both.group_dir_authors).all()
    capped = _build(layout="published", seed=7)  # the 2,000-character cap
    kept = oracle[oracle.prompt.str.len() <= 2000]
    assert set(zip(capped.group, capped.few_shot_num)) == set(zip(kept.group, kept.few_shot_num))
    assert len(capped) < len(oracle)


def test_procedure_k_shot_extends_k_minus_one_by_one_demonstration(procedure):
    for group, rows in procedure.groupby("group"):
        rows = rows.sort_values("few_shot_num")
        assert rows.few_shot_num.tolist() == list(range(len(rows)))  # the cap removes a tail of shot counts
        previous = None
        for row in rows.itertuples():
            blocks = parse_prompt(row.prompt)
            assert len(blocks) == row.few_shot_num + 1 and blocks[-1].answer is None
            assert group not in row.demo_groups and len(row.demo_groups) == row.few_shot_num
            if previous is not None:
                assert blocks[:-2] == previous[:-1] and blocks[-1] == previous[-1]
            previous = blocks
        for block in previous[:-1]:
            assert block.answer.startswith("The most likely hateful or sarcastic pair is #")
    full = procedure[procedure.few_shot_num == procedure.few_shot_num.max()].iloc[0]
    blocks = parse_prompt(full.prompt)
    first = procedure[(procedure.group == full.demo_groups[0]) & (procedure.few_shot_num == 0)].prompt.iloc[0]
    assert _pairs(full.prompt, 0) == _pairs(first)  # a demonstration is another target group, whole


def test_char_cap_drops_prompts_and_never_trims(procedure):
    uncapped = _build(layout="published", char_cap=10**9)
    assert (uncapped.chars > 2000).sum() == sum(procedure.attrs["dropped"].values()) > 0
    assert procedure.chars.max() <= 2000
    key = ["group", "few_shot_num"]
    merged = procedure.merge(uncapped, on=key, suffixes=("", "_full"))
    assert len(merged) == len(procedure) and (merged.prompt == merged.prompt_full).all()  # kept ones untouched
    tight = _build(layout="published", char_cap=900, shots=[0, 1, 2])
    full = uncapped[uncapped.few_shot_num <= 2].set_index(key).prompt
    assert set(tight.set_index(key).index) == set(full[full.str.len() <= 900].index)


def test_numpy123_quicksort_known_answers(monkeypatch):
    assert argsort_numpy123([]).tolist() == [] and argsort_numpy123([5]).tolist() == [0]
    # up to 16 items numpy 1.23 uses insertion sort only: equal keys keep their order
    assert argsort_numpy123([2, 1, 2, 1, 0]).tolist() == [4, 1, 3, 0, 2]
    # 17 items: one partition. Median of 3 (places 0, 8, 16: all 1) is pivot 1, moved to place 15; the scans
    # swap places 2/14, 4/13, 6/12, 10/11, stop at 11 and put the pivot there; the left part 0..10 holds the
    # items [0, 1, 14, 3, 13, 5, 12, 7, 15, 9, 11] and is insertion-sorted (the 0s: 1, 3, 13, 5, 7, 15, 9,
    # 11), the pivot and the right part, [8, 6, 4, 2, 10, 16], are all 1s and stay.
    alternating = [1, 0] * 8 + [1]
    assert argsort_numpy123(alternating).tolist() == [1, 3, 13, 5, 7, 15, 9, 11, 0, 14, 12, 8, 6, 4, 2, 10, 16]
    # numpy 1.23.5's own output (recorded) on 40 keys with many ties
    assert argsort_numpy123([i * 7 % 3 for i in range(40)]).tolist() == [
        0, 36, 33, 30, 27, 24, 21, 18, 15, 12, 39, 9, 3, 6, 25, 37, 1, 34, 31, 28, 4, 10, 19, 16, 13, 7, 22, 14, 35,
        8, 2, 32, 23, 29, 38, 26, 20, 5, 17, 11]
    # the heapsort fallback, by hand: heap [0, 1, 2] over keys [1, 1, 0] pops 0 then 1: the tie is reversed
    items = [0, 1, 2]
    npsort._aheapsort([1, 1, 0], items, 0, 3)
    assert items == [2, 1, 0]
    # without ties every correct sort agrees: today's numpy, on shuffled keys and on a median-of-3 killer
    # sequence (Musser) that exhausts the depth limit and runs the heapsort fallback
    keys = np.random.default_rng(0).permutation(1000)
    assert (argsort_numpy123(keys) == np.argsort(keys, kind="stable")).all()
    killer = [0] * 1000
    for i in range(1, 501):
        if i % 2:
            killer[i - 1], killer[i] = i, 500 + i
        killer[499 + i] = 2 * i
    heaps = []
    monkeypatch.setattr(npsort, "_aheapsort", lambda *a: heaps.append(a[3]) or _HEAPSORT(*a))
    assert (argsort_numpy123(killer) == np.argsort(killer, kind="stable")).all() and heaps


_HEAPSORT = npsort._aheapsort
_HEADER = ("User: Out of image-caption pairs #0 to #{}, select the most likely hateful or sarcastic pair, together "
           "with potential label (hateful or sarcastic). If all pairs are benign, say 'All pairs are benign'.\n")


def _hand_split() -> tuple[pd.DataFrame, dict, dict]:
    """Three target groups and one all-benign group. 00005 has 00003's exact line, so one of them is listed
    once; meme 00002 is listed twice in the table (a duplicate row); 00004 is in two groups; 00001's text holds
    a '#'. The caption table lists the memes in its own order (that of ``descriptions``)."""
    conf = pd.DataFrame({
        "id": ["00001", "00002", "00003", "00004", "00005", "00006", "00007", "00008", "00002"], "split": "dev_seen",
        "label": [1, 0, 1, 0, 1, 0, 0, 0, 0],
        "img_org_id": ["00001", "00001", "00003", "00003", None, None, "00007", "00007", "00001"],
        "txt_org_id": [None, None, None, "00006", "00006", "00006", None, None, None]})
    texts = {"00001": "we're #1 at this", "00002": "a caption of love", "00003": "same words", "00004": "other words",
             "00005": "same words", "00006": "third words", "00007": "benign a", "00008": "benign b"}
    descriptions = {"00006": "a child", "00002": "a cat", "00008": "a car", "00001": "an image of a dog",
                    "00004": "a woman", "00003": "a man", "00005": "a man", "00007": "a tree", "00009": "unused"}
    return conf, texts, descriptions


def test_procedure_on_a_hand_built_split_equals_the_authors_script():
    # expected values: the authors' script, unmodified, under numpy 1.23.5 / pandas 1.5.3, seed 0
    conf, texts, descriptions = _hand_split()
    members = published_groups(conf, "dev_seen", texts, descriptions, seed=0)
    assert members.targets == ["00001", "00003", "00006"]  # 00007 is all benign
    assert list(zip(members.rows.group, members.rows.id)) == [  # shuffled; 00003's line was kept in 00006 first
        ("00006", "00005"), ("00001", "00001"), ("00006", "00006"), ("00003", "00004"), ("00001", "00002")]
    table = published_prompt_table(conf, "dev_seen", texts, descriptions, shots=(0, 1, 2), seed=0, char_cap=None)
    rows = table[table.few_shot_num == 2].set_index("group")
    assert rows.group_dir.tolist() == ["00001_0_pos_max_1", "00003__pos_max_0", "00006_0_pos_max_1"]
    assert rows.member_ids.tolist() == [["00001", "00002"], ["00004"], ["00005", "00006"]]
    assert rows.demo_groups.tolist() == [["00003", "00006"], ["00001", "00006"], ["00003", "00001"]]
    dog = ("#0: caption: 'we're #1 at this', image: 'an picture of a dog'\n"
           "#1: caption: 'a text of love', image: 'a cat'")
    woman = "#0: caption: 'other words', image: 'a woman'"
    man = "#0: caption: 'same words', image: 'a man'\n#1: caption: 'third words', image: 'a child'"
    answer = ("\nSystem:\n\nThe most likely hateful or sarcastic pair is {}, with the potential label "
              "'hateful'.\n\nUser:\n")
    # the header counts every '#' of the zero-shot prompt (#0 to #2 for two pairs); 00003's block lost its
    # hateful member to 00006, so its answer names none
    assert rows.prompt["00001"] == (_HEADER.format(2) + woman + answer.format("") + man + answer.format("#0") + dog
                                    + "\nSystem:")
    assert rows.prompt["00003"] == (_HEADER.format(0) + dog + answer.format("#0") + man + answer.format("#0") + woman
                                    + "\nSystem:")
    assert table.set_index(["group", "few_shot_num"]).prompt[("00006", 0)] == _HEADER.format(1) + man + "\nSystem:"
    ranks = group_ranks(["00006", "00001", "00003"], "00001", 0, seed=0)
    drawn = [ranks["00006"], ranks["00003"]]  # distinct draws from 0..3; the target sorts last
    assert ranks["00001"] == TARGET_RANK and len(set(drawn)) == 2 and all(0 <= r <= 3 for r in drawn)
    with pytest.raises(UserError, match="3-shot prompts need 3 other target groups, only 2 exist"):
        published_prompt_table(conf, "dev_seen", texts, descriptions, shots=(0, 3))
    with pytest.raises(UserError, match=r"1 confounder-group members are not in the caption table \(ids 00008\)"):
        published_groups(conf, "dev_seen", texts, {k: v for k, v in descriptions.items() if k != "00008"})


def test_missing_or_nan_descriptions_are_an_error_naming_ids(tmp_path):
    caps = pd.read_parquet(_data()["captions"])
    caps.loc[caps.image_id == "01456", "text_captioned"] = None
    path = tmp_path / "captions.parquet"
    caps.to_parquet(path)
    for layout in ("published", "memefx"):
        with pytest.raises(UserError, match=r"no image description \(missing or NaN\): ids 01456"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_prompts(_data()["confounders"], path, _data()["hmc"], layout=layout)


@pytest.mark.slow  # imports the whole CLI (Lightning) and builds two prompt sets: about 30 s
def test_cli_replays_and_builds_the_published_layout(tmp_path, capsys):
    from memefx.cli import main

    data = {k: str(v) for k, v in _data().items()}
    common = ["--captions", data["captions"], "--hmc", data["hmc"], "--confounders", data["confounders"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["icl", "prompts", *common, "--from-published", str(shared_file("llm_answers.csv")),
                     "--out", str(tmp_path / "replay.parquet")]) == 0
        assert main(["icl", "prompts", *common, "--layout", "published", "--shots", "0,1",
                     "--out", str(tmp_path / "procedure.parquet")]) == 0
    replay = pd.read_parquet(tmp_path / "replay.parquet")
    assert len(replay) == 247 and replay.rebuilt.all() and all(len(ids) for ids in replay.member_ids)
    procedure = pd.read_parquet(tmp_path / "procedure.parquet")
    assert procedure.group.nunique() == 97 and set(procedure.few_shot_num) == {0, 1}
    assert all(len(labels) == pairs_in_prompt(p) for labels, p in zip(procedure.member_labels, procedure.prompt))


def test_replayed_prompts_compare_with_the_published_answers_pair_by_pair(published):
    from memefx.icl.parse import parse_table

    table = _build(from_published=shared_file("llm_answers.csv"))
    answer = " The most likely hateful or sarcastic pair is #0, with the potential label 'hateful'."
    rows = parse_table(table.assign(generated_text=answer))  # a new model's run: expanded to one row per pair
    reference = published.drop_duplicates().assign(image_id=published.image_id.map(lambda g: f"{g:05d}"))
    both = rows.merge(reference, on=["image_id", "few_shot_num", "ans_num"], suffixes=("", "_published"))
    assert len(both) == len(reference) == 675  # every published pair row has its counterpart
    assert (both.ground_truth == both.ground_truth_published).all() and both.id.str.fullmatch(r"\d{5}").all()
    assert (both.parsed_is_hateful == (both.ans_num == 0)).all()



def test_replay_refuses_an_empty_file_and_data_that_maps_nothing(published, tmp_path):
    header = tmp_path / "header.csv"
    published.iloc[:0].to_csv(header, index=False)
    with pytest.raises(UserError, match="holds no answer rows"):
        _build(from_published=header)
    answers = published[["image_id", "few_shot_num", "prompt"]].drop_duplicates().head(5)
    texts = {"00001": "words that no prompt shows", "00002": "nor these"}
    descriptions = {"00001": "a picture", "00002": "another picture"}
    with pytest.raises(UserError, match=r"none of the \d+ target pairs of its 5 prompts matches a meme of split "
                                         r"'dev_seen'"):
        replay_published(answers, texts, descriptions, {"00001": 1, "00002": 0})
    torn = tmp_path / "torn.csv"
    torn.write_text('image_id,few_shot_num,prompt\n1456,0,"User: Out of image-caption pairs #0 to #1')
    with pytest.raises(UserError, match=r"not a readable answer table: .*torn.csv"):
        _build(from_published=torn)
