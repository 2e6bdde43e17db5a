"""Prompt layout against the published prompts, and the seeded demonstration sampler."""

from __future__ import annotations

import pandas as pd
import pytest

from memefx.icl.parse import pairs_in_prompt
from memefx.icl.prompts import Member, gold_answer, pair_prompt, parse_prompt, render, sample_demonstrations
from tests.conftest import shared_file


def test_every_published_prompt_round_trips():
    prompts = pd.read_csv(shared_file("llm_answers.csv"))[["prompt", "few_shot_num"]].drop_duplicates("prompt")
    assert len(prompts) > 200
    for prompt, shots in zip(prompts.prompt, prompts.few_shot_num):
        blocks = parse_prompt(prompt)
        assert len(blocks) == shots + 1  # k demonstrations, then the target
        assert blocks[-1].answer is None and all(b.answer for b in blocks[:-1])
        assert render(blocks) == prompt
        assert pairs_in_prompt(prompt) == len(blocks[-1].members)


def test_builder_writes_the_published_layout():
    demo = [Member("can you smell it", "a camp", 1), Member("never forget", "a camp", 0)]
    target = [Member("a caption with an image word", "an image", -1), Member("b", "c", -1)]
    prompt = pair_prompt(target, [demo])
    assert prompt == (
        "User: Out of image-caption pairs #0 to #1, select the most likely hateful or sarcastic pair, together with "
        "potential label (hateful or sarcastic). If all pairs are benign, say 'All pairs are benign'.\n"
        "#0: caption: 'can you smell it', image: 'a camp'\n#1: caption: 'never forget', image: 'a camp'\nSystem:\n\n"
        "The most likely hateful or sarcastic pair is #0, with the potential label 'hateful'.\n\nUser:\n"
        "#0: caption: 'a text with an picture word', image: 'an picture'\n#1: caption: 'b', image: 'c'\nSystem:")
    assert gold_answer([Member("x", "y", 0)]) == "All pairs are benign."


def test_sampler_is_seeded_excludes_target_and_respects_budget():
    pool = [f"{i:05d}" for i in range(50)]
    a = sample_demonstrations(pool, "00007", 4, seed=1)
    assert a == sample_demonstrations(pool, "00007", 4, seed=1) and "00007" not in a and len(set(a)) == 4
    assert a != sample_demonstrations(pool, "00007", 4, seed=2)
    fitted = sample_demonstrations(pool, "00007", 4, seed=1, cost=lambda s: 100, budget=350)
    assert fitted == a[:2]
    with pytest.raises(ValueError, match="only 49 other strata"):
        sample_demonstrations(pool, "00007", 50, seed=0)


def _real(**kwargs) -> pd.DataFrame:
    """Prompts from the shared tables, the meme text from the HMC files (unless ``hmc=None`` is given)."""
    from memefx.icl.prompts import build_prompts

    conf, caps = shared_file("confounders.parquet"), shared_file("hm_captions.parquet")
    kwargs.setdefault("hmc", shared_file("hmc/dev_seen.jsonl").parent)
    with pytest.warns(UserWarning, match="duplicate rows"):
        return build_prompts(conf, caps, **kwargs)


def test_prompt_table_from_real_strata():
    table = _real(split="dev_seen", shots=[0, 2])
    assert table.group.nunique() == 84 and set(table.few_shot_num) == {0, 2}  # dev_seen shared_image strata
    for row in table.itertuples():
        blocks = parse_prompt(row.prompt)
        assert len(blocks) == row.few_shot_num + 1 and render(blocks) == row.prompt
        assert row.group not in row.demo_groups and len(row.demo_groups) == row.few_shot_num
        assert 1 in row.member_labels and 0 in row.member_labels
        assert len(blocks[-1].members) == len(row.member_labels) == len(row.member_ids)
        assert row.member_ids == sorted(row.member_ids)  # memefx's layout lists members by id
    pd.testing.assert_frame_equal(table, _real(shots=[0, 2]))  # seeded


def test_meme_text_comes_from_the_hmc_files_when_given():
    hmc = shared_file("hmc/dev_seen.jsonl").parent
    table = _real(hmc=hmc, shots=[0])
    texts = pd.read_json(hmc / "dev_seen.jsonl", lines=True, dtype={"id": str}).set_index("id").text
    for row in table.itertuples():
        assert [m.text for m in parse_prompt(row.prompt)[-1].members] == [texts[i] for i in row.member_ids]


def test_without_the_hmc_files_the_meme_text_column_must_be_named(tmp_path):
    """hm_captions.parquet's `text` is a BLIP-2 description (equal to the meme text for a minority of memes):
    never a silent stand-in. A column that holds the meme text, named with text_column, is used as given."""
    from memefx.icl.prompts import PromptInputError, build_prompts

    conf, caps = shared_file("confounders.parquet"), shared_file("hm_captions.parquet")
    hmc = shared_file("hmc/dev_seen.jsonl").parent
    for column, match in ((None, "no meme text: .*give --hmc DIR .* or --text_column=COLUMN"),
                          ("text", "--text_column='text' is a BLIP-2 description of the image")):
        with pytest.raises(PromptInputError, match=match):
            build_prompts(conf, caps, text_column=column)
    with pytest.raises(PromptInputError, match="--text_column: not used with --hmc"):
        build_prompts(conf, caps, hmc=hmc, text_column="meme_text")
    texts = pd.read_json(hmc / "dev_seen.jsonl", lines=True, dtype={"id": str}).set_index("id").text
    table = pd.read_parquet(caps)
    ids = table.image_id.astype(str).str.zfill(5)
    assert (table.text[ids.isin(texts.index)] == ids[ids.isin(texts.index)].map(texts)).mean() < 0.5
    table["meme_text"] = ids.map(texts).fillna(table.text)
    table.to_parquet(tmp_path / "captions.parquet")
    with pytest.warns(UserWarning, match="duplicate rows"):
        named = build_prompts(conf, tmp_path / "captions.parquet", text_column="meme_text", shots=[0])
    from_hmc = _real(shots=[0])
    assert named.prompt.tolist() == from_hmc.prompt.tolist() and named.member_ids.tolist() == from_hmc.member_ids.tolist()


def test_budget_drops_demonstrations_without_duplicates_and_per_meme_prompts(tmp_path):
    from memefx.data.collate import train_wordpiece

    caps = shared_file("hm_captions.parquet")
    tok = train_wordpiece(pd.read_parquet(caps).text.head(500).tolist(), 2000)
    tok.save_pretrained(tmp_path / "tok")
    table = _real(shots=[4], budget=400, tokenizer=str(tmp_path / "tok"))
    lengths = table.prompt.map(lambda p: len(tok(p)["input_ids"]))
    assert ((lengths <= 400) | (table.few_shot_num == 0)).all() and (table.few_shot_num < 4).any()
    memes = _real(per_meme=True)
    assert memes.id.is_unique and set(memes.label) == {0, 1} and memes.prompt.str.endswith("\nSystem:").all()


def test_budget_never_repeats_a_prompt():
    from memefx.icl.prompts import build_prompt_table

    members = pd.DataFrame({"anchor": [f"{g:05d}" for g in range(12) for _ in range(2)],
                            "id": [f"{i:05d}" for i in range(100, 124)], "label": [1, 0] * 12})
    texts = {i: f"text of meme {i} " * (1 + int(i) % 5) for i in members.id}
    descriptions = {i: "a description" for i in members.id}
    every = build_prompt_table(members, texts, descriptions, (0, 1, 2, 3, 4), seed=0, budget=900, cost=len)
    assert not every.duplicated(["group", "few_shot_num"]).any() and not every.prompt.duplicated().any()
    assert ((every.prompt.str.len() <= 900) | (every.few_shot_num == 0)).all()
    assert (every.groupby("group").few_shot_num.max() < 4).all()  # larger k would repeat a smaller k: dropped
    assert (every.requested_shots == every.few_shot_num).all()
    assert len(every) + every.attrs["not_repeated"] == 12 * 5 and every.attrs["not_repeated"] > 0  # counted
    only_four = build_prompt_table(members, texts, descriptions, (4,), seed=0, budget=900, cost=len)
    assert (only_four.few_shot_num < 4).all() and len(only_four) == 12  # alone, a trimmed prompt is kept


@pytest.mark.parametrize("options,named", [
    ({"from_published": "answers.csv", "char_cap": 900}, "--char-cap"),
    ({"from_published": "answers.csv", "layout": "published", "seed": 3}, "--layout published, --seed"),
    ({"from_published": "answers.csv", "per_meme": True}, "--per-meme"),
    ({"layout": "published", "budget": 400, "tokenizer": "tok"}, "--budget, --tokenizer"),
    ({"char_cap": 900}, "--char-cap"),
    ({"from_published": "answers.csv", "kind": "shared_text"}, "--kind"),  # these take both kinds
    ({"layout": "published", "kind": "shared_image"}, "--kind"),
    ({"per_meme": True, "kind": "shared_text", "seed": 3}, "--kind, --seed"),
    ({"per_meme": True, "budget": 400, "tokenizer": "tok"}, "--budget, --tokenizer"),
])
def test_an_option_the_prompt_set_does_not_use_is_refused(options, named):
    from memefx.icl.prompts import PromptInputError, build_prompts

    with pytest.raises(PromptInputError, match=f"^{named}: not used by"):
        build_prompts(captions="caps.parquet", **options)
