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


def test_prompt_table_from_real_strata(tmp_path, capsys):
    import json

    from memefx.cli import main

    conf, caps = shared_file("confounders.parquet"), shared_file("hm_captions.parquet")
    with pytest.warns(UserWarning, match="duplicate rows"):
        assert main(["icl", "prompts", "--confounders", str(conf), "--captions", str(caps), "--split", "dev_seen",
                     "--shots", "0,2", "--out", str(tmp_path / "p.parquet")]) == 0
    table = pd.read_parquet(tmp_path / "p.parquet")
    assert table.group.nunique() == 84 and set(table.few_shot_num) == {0, 2}  # dev_seen shared_image strata
    for row in table.itertuples():
        blocks = parse_prompt(row.prompt)
        assert len(blocks) == row.few_shot_num + 1 and render(blocks) == row.prompt
        assert row.group not in json.loads(row.demonstrations)
        labels = json.loads(row.gold_labels)
        assert 1 in labels and 0 in labels and len(blocks[-1].members) == len(labels)
    again = tmp_path / "q.parquet"
    main(["icl", "prompts", "--confounders", str(conf), "--captions", str(caps), "--shots", "0,2", "--out", str(again)])
    pd.testing.assert_frame_equal(table, pd.read_parquet(again))  # seeded


def test_budget_drops_demonstrations_and_per_meme_prompts(tmp_path):
    from memefx.cli import main
    from memefx.data.collate import train_wordpiece

    conf, caps = shared_file("confounders.parquet"), shared_file("hm_captions.parquet")
    tok = train_wordpiece(pd.read_parquet(caps).text.head(500).tolist(), 2000)
    tok.save_pretrained(tmp_path / "tok")
    with pytest.warns(UserWarning):
        main(["icl", "prompts", "--confounders", str(conf), "--captions", str(caps), "--shots", "4", "--budget", "400",
              "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "b.parquet")])
    table = pd.read_parquet(tmp_path / "b.parquet")
    lengths = table.prompt.map(lambda p: len(tok(p)["input_ids"]))
    assert ((lengths <= 400) | (table.few_shot_num == 0)).all() and (table.few_shot_num < 4).any()
    with pytest.warns(UserWarning):
        main(["icl", "prompts", "--confounders", str(conf), "--captions", str(caps), "--per-meme",
              "--out", str(tmp_path / "m.parquet")])
    memes = pd.read_parquet(tmp_path / "m.parquet")
    assert memes.id.is_unique and set(memes.label) == {0, 1} and memes.prompt.str.endswith("\nSystem:").all()
