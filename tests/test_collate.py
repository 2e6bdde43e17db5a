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
