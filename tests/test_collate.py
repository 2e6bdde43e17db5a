"""Segments come from the tokenizer's sequence ids: [CLS]/[SEP] special, text, image side, pad."""

from __future__ import annotations

import torch

from memefx.data.collate import IMAGE, PAD, SPECIAL, TEXT, encode, train_wordpiece

CORPUS = ["when zorblings love pizza", "a red striped star on a white background", "pilots hate mondays"]


def test_wordpiece_is_deterministic():
    a, b = train_wordpiece(CORPUS * 3, 200), train_wordpiece(CORPUS * 3, 200)
    assert a.get_vocab() == b.get_vocab()


def test_single_text_segments():
    tok = train_wordpiece(CORPUS, 200)
    enc = encode(tok, ["pilots hate mondays", "when zorblings love pizza again and again"], max_length=16)
    seg, ids = enc["segments"], enc["input_ids"]
    for b in range(2):
        n = int(enc["attention_mask"][b].sum())
        assert seg[b, 0] == SPECIAL and ids[b, 0] == tok.cls_token_id
        assert seg[b, n - 1] == SPECIAL and ids[b, n - 1] == tok.sep_token_id  # [SEP] is special, not text
        assert (seg[b, 1 : n - 1] == TEXT).all()
        assert (seg[b, n:] == PAD).all()
    assert (enc["segments"] == PAD).sum() > 0  # the shorter text is padded


def test_pair_segments_put_description_on_image_side():
    tok = train_wordpiece(CORPUS, 200)
    enc = encode(tok, ["pilots hate mondays"], ["a red striped star"], max_length=32)
    seg = enc["segments"][0].tolist()
    ids = enc["input_ids"][0].tolist()
    seps = [i for i, t in enumerate(ids) if t == tok.sep_token_id]
    assert seg == [SPECIAL] + [TEXT] * (seps[0] - 1) + [SPECIAL] + [IMAGE] * (seps[1] - seps[0] - 1) + [SPECIAL]
    assert torch.equal((enc["token_type_ids"][0] == 1).nonzero().flatten(), torch.arange(seps[0] + 1, seps[1] + 1))


def test_vocab_respects_size_and_unknown_words_fall_back_to_characters():
    tok = train_wordpiece(CORPUS, 60)
    assert len(tok) <= 60
    pieces = tok.tokenize("zorblings")
    assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == "zorblings"


def test_max_length_must_hold_specials_and_one_token_per_segment():
    import pytest

    from memefx.data.collate import check_max_length

    tok = train_wordpiece(CORPUS, 200)
    with pytest.raises(ValueError, match=r"max_length=1 cannot hold the 2 special tokens plus one text token: "
                                         r"set it to at least 3"):
        check_max_length(tok, 1, pair=False)
    with pytest.raises(ValueError, match=r"max_length=4 cannot hold the 3 special tokens plus one meme-text token "
                                         r"and one image-side token: set it to at least 5"):
        check_max_length(tok, 4, pair=True)
    check_max_length(tok, 3, pair=False)
    check_max_length(tok, 5, pair=True)
    enc = encode(tok, ["pilots hate mondays"], ["a red star"], max_length=5)  # the smallest allowed keeps both
    assert set(enc["segments"][0].tolist()) == {SPECIAL, TEXT, IMAGE}


def test_batches_name_their_split_and_never_mix_two():
    import pytest

    from memefx.data.collate import MemeCollator

    tok = train_wordpiece(CORPUS, 200)
    item = {"id": "00001", "text": "pilots", "label": -1, "stratum_image": -1, "stratum_text": -1}
    batch = MemeCollator(tok, 16)([{**item, "split": "test_unseen"}, {**item, "id": "00002", "split": "test_unseen"}])
    assert batch["split"] == "test_unseen" and batch["labels"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match=r"mixes memes of splits \['dev_seen', 'test_seen'\]"):
        MemeCollator(tok, 16)([{**item, "split": "dev_seen"}, {**item, "split": "test_seen"}])
