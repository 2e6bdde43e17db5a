"""The published prompt set: replay of the shared prompts byte for byte, and the published procedure."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest

from memefx.icl.parse import pairs_in_prompt
from memefx.icl.prompts import PromptInputError as UserError
from memefx.icl.prompts import build_prompts, parse_prompt
from memefx.icl.published import (
    demonstration_order,
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


def test_procedure_finds_the_published_targets_and_zero_shot_pairs(procedure, published):
    assert procedure.group.nunique() == 97  # the published run's dev_seen target groups
    zero = procedure[procedure.few_shot_num == 0].set_index("group")
    assert len(zero) == 97
    shared = published[published.few_shot_num == 0].drop_duplicates("image_id")
    assert len(shared) == 65
    for group, prompt in zip(shared.image_id, shared.prompt):
        ours = zero.loc[f"{group:05d}", "prompt"]
        assert ours.split("\n", 1)[0] == prompt.split("\n", 1)[0]  # instruction with the pair count
        assert _pairs(ours) == _pairs(prompt)  # equal up to the order of pairs
    for row in zero.itertuples():
        assert len(row.member_ids) == pairs_in_prompt(row.prompt) == len(set(row.member_ids))
    # a target keeps both labels unless a member's line duplicates a kept one (published: dropped, as here)
    one_label = zero[zero.member_labels.map(lambda x: len(set(x)) < 2)]
    assert one_label.index.tolist() == ["43810"]  # its benign member 56124 has the hateful anchor's exact line


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


def test_procedure_seeds_and_rules_on_a_hand_built_split():
    # group A: anchor A (hateful) with B and C sharing its picture; B also anchors its own shared-text group
    # with D. B is ranked before its place in A inside its own group, so its line is listed there only.
    conf = pd.DataFrame({"id": ["0000A", "0000B", "0000C", "0000D"], "split": "dev_seen",
                         "label": [1, 1, 0, 0], "img_org_id": ["0000A", "0000A", "0000A", None],
                         "txt_org_id": [None, "0000B", None, "0000B"]})
    texts = {i: f"text {i} with a caption" for i in conf.id}
    descriptions = {i: f"image of {i}" for i in conf.id}
    groups = published_groups(conf, "dev_seen", texts, descriptions, seed=0)
    assert sorted(groups) == ["0000A", "0000B"]
    assert sorted(groups["0000A"].id) == ["0000A", "0000C"] and sorted(groups["0000B"].id) == ["0000B", "0000D"]
    assert groups["0000A"].line[0].startswith("caption: 'text") and "picture of" in groups["0000A"].line[0]
    table = published_prompt_table(conf, "dev_seen", texts, descriptions, shots=(0, 1), seed=0, char_cap=None)
    assert len(table) == 4 and table.groupby("group").demo_groups.apply(lambda s: s.iloc[1]).tolist() == [
        ["0000B"], ["0000A"]]
    one = table[(table.group == "0000A") & (table.few_shot_num == 1)].prompt.iloc[0]
    where = groups["0000B"].id.tolist().index("0000B")
    assert parse_prompt(one)[0].answer == (f"The most likely hateful or sarcastic pair is #{where}, with the potential "
                                           "label 'hateful'.")
    assert demonstration_order(list("abcdef"), 2, 5) == demonstration_order(list("abcdef"), 2, 5)
    orders = {tuple(demonstration_order(list("abcdefgh"), 0, s)) for s in range(10)}
    assert len(orders) > 5 and all("a" not in o and len(o) == 7 for o in orders)
    with pytest.raises(UserError, match="2-shot prompts need 2 other target groups, only 1 exist"):
        published_prompt_table(conf, "dev_seen", texts, descriptions, shots=(0, 2))


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

