"""The published meta-gradient features against answers written out by hand from the reference code's rules
(``script/llama/hf/meta_gradient.py``, ``calculation.py``, ``modality_generation.py``, the pipeline copy
``text_generation.py`` and the notebook ``hf_llama2.ipynb``), and the notebook's classifier and split.

The tokenizer splits on spaces and punctuation and keeps the newline as a token (as Llama's byte token
does), so every token of a prompt can be written down. The model's layer 0 has zero query weights: every
head attends uniformly to the keys it may see, and query ``t`` puts 1 / (t + 1) on each key ``j <= t``; the
mass of a block is then ``heads * (keys of the block up to t) / (t + 1)``. Layer 1 attends far from
uniformly, and the tokenizer has a BOS token: reading layer 1, or the tokens with a BOS, changes every value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memefx.icl.metagrad_published import (
    PUBLISHED_PAD,
    group_columns,
    pad_end,
    reference_delta,
    reference_spans,
    reference_vectors,
    span_masks,
)
from memefx.icl.prompts import Member, pair_prompt

HEADS = 4
TARGET = [Member("a", "b"), Member("c", "d")]
DEMOS = [[Member("e", "f", 1), Member("g", "h", 0)], [Member("i", "j", 0), Member("k", "l", 1)]]
# The target block's 32 tokens, the same at the end of every prompt of the group:
#  0 #  1 0  2 :  3 caption  4 :  5 '  6 a  7 '  8 ,  9 image 10 :  11 '  12 b  13 '  14 \n
# 15 #  16 1  17 :  18 caption  19 :  20 '  21 c  22 '  23 ,  24 image  25 :  26 '  27 d  28 '  29 \n
# 30 System  31 :
BLOCK = 32
CAPTION_QUERIES = [3, 4, 5, 6, 7, 8, 18, 19, 20, 21, 22, 23]  # token offsets in the block
CAPTION_KEYS_SEEN = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # caption keys at or before each of them
IMAGE_QUERIES = [9, 10, 11, 12, 13, 14, 15, 24, 25, 26]  # pair 0 through the next '#'; pair 1 stops at L - 5
IMAGE_KEYS_SEEN = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
CROSS_QUERIES = [9, 10, 11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 24, 25, 26]  # pair 0's captions see no image
CROSS_KEYS_SEEN = [6] * 7 + [7] * 6 + [12] * 3


def _prompts() -> dict[int, str]:
    return {k: pair_prompt(TARGET, DEMOS[:k]) for k in range(3)}


def _word_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated"),
                                   pre_tokenizers.Punctuation("isolated")])
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)})
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[BOS]", *words])}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", bos_token="[BOS]")


def _uniform_layer0_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.zero_()
        for proj in (model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.k_proj):
            proj.weight.normal_(0, 3.0)
    return model


def _tokens(tok, prompt: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(prompt, add_special_tokens=False)["input_ids"])


def test_spans_by_the_reference_rules_written_out_token_by_token():
    prompts = _prompts()
    tok = _word_tokenizer(list(prompts.values()))
    for k, prompt in prompts.items():
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        tokens = tok.convert_ids_to_tokens(enc["input_ids"])
        spans = reference_spans(prompt, enc["offset_mapping"])
        got = [(tokens[s["caption"][0]:s["caption"][1]], tokens[s["image"][0]:s["image"][1]]) for s in spans]
        assert got == [
            (["caption", ":", "'", "a", "'", ","], ["image", ":", "'", "b", "'", "\n", "#"]),  # labels, quotes, \n, #
            (["caption", ":", "'", "c", "'", ","], ["image", ":", "'"]),  # the last stops at L - 5: no "d", no "'"
        ], k
        assert spans[0]["caption"][0] == len(tokens) - BLOCK + 3  # the target block, not a demonstration


def test_vectors_of_a_hand_built_map_drop_exact_zeros():
    # tokens 0..5: caption = {1, 2}, image = {3, 4}; two heads
    caption, image = span_masks(6, [{"caption": (1, 3), "image": (3, 5)}])
    att = torch.zeros(2, 6, 6)
    att[0, 1, :2] = torch.tensor([0.5, 0.5])
    att[1, 1, :2] = torch.tensor([0.75, 0.25])  # token 1: 0.5 + 0.25 on caption keys
    att[0, 2, :3] = torch.tensor([1.0, 0.0, 0.0])  # token 2: no mass on captions in either head: dropped
    att[0, 3, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    att[1, 3, :4] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # token 3: captions 0.5 + 0.5, images 0.4 + 0.5
    att[0, 4, :5] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])  # token 4: captions 0.4, images 0.4
    att[:, 5] = 1 / 6  # token 5 lies in no span
    vectors = reference_vectors(att, caption, image)
    assert torch.allclose(vectors["caption_caption"], torch.tensor([0.75]))
    assert torch.allclose(vectors["image_image"], torch.tensor([0.9, 0.4]))
    assert torch.allclose(vectors["cross"], torch.tensor([1.0, 0.4]))  # captions 1, 2 see no image key: dropped


def test_delta_is_cut_from_the_end_and_padding_goes_at_the_end():
    assert reference_delta(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0])).tolist() == [5.0, 5.0]
    with pytest.raises(ValueError, match="fewer than the zero-shot one's 3"):
        reference_delta(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    padded, was_cut = pad_end(torch.tensor([1.0, 2.0, 3.0]), 5)
    assert padded.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0] and not was_cut
    cut, was_cut = pad_end(torch.arange(6.0), 4)
    assert cut.tolist() == [0.0, 1.0, 2.0, 3.0] and was_cut
    zero = {"caption_caption": torch.tensor([1.0]), "image_image": torch.tensor([2.0]), "cross": torch.tensor([3.0])}
    shot = {kind: v + 1 for kind, v in zero.items()}
    columns, n_cut = group_columns(zero, shot)
    assert n_cut == 0 and len(columns) == 2 * (100 + 172 + 212) == 968
    names = list(columns)
    assert names[:2] == ["L0_P_caption_caption_p0_zs", "L0_P_caption_caption_p1_zs"]
    assert names[100] == "L0_P_caption_caption_p0_delta" and names[200] == "L0_P_image_image_p0_zs"
    assert names[-1] == "L0_P_cross_p211_delta"  # the notebook's order: caption zsl, delta_1, image ..., cross ...
    assert columns["L0_P_image_image_p0_zs"] == 2.0 and columns["L0_P_image_image_p0_delta"] == 1.0
    assert columns["L0_P_image_image_p171_zs"] == 0.0


def _expected(start: int, queries: list[int], seen: list[int]) -> list[float]:
    return [HEADS * n / (start + q + 1) for q, n in zip(queries, seen)]


def test_features_table_known_answer_layer0_no_bos_delta1_on_every_row():
    from memefx.icl.metagrad_features import features_table

    prompts = _prompts()
    lonely = pair_prompt([Member("m", "n"), Member("o", "p")])  # a group with a zero-shot prompt only
    tok = _word_tokenizer([*prompts.values(), lonely])
    model = _uniform_layer0_llama(len(tok))
    answers = pd.DataFrame({"image_id": ["g"] * 3 + ["z"], "few_shot_num": [0, 1, 2, 0],
                            "prompt": [prompts[0], prompts[1], prompts[2], lonely]})
    table = features_table(answers, model, tok, features="published")

    published = [c for c in table.columns if c.startswith("L")]
    assert len(published) == 968 and all(c.startswith("L0_P_") for c in published)  # layer 0 only
    start0 = len(_tokens(tok, prompts[0])) - BLOCK  # no BOS before the prompt
    start1 = len(_tokens(tok, prompts[1])) - BLOCK  # delta_1: the 1-shot prompt, on every row
    rows = table[table.image_id == "g"].set_index("few_shot_num")
    for kind, queries, seen in (("caption_caption", CAPTION_QUERIES, CAPTION_KEYS_SEEN),
                                ("image_image", IMAGE_QUERIES, IMAGE_KEYS_SEEN),
                                ("cross", CROSS_QUERIES, CROSS_KEYS_SEEN)):
        zero = _expected(start0, queries, seen)
        delta = [s - z for s, z in zip(_expected(start1, queries, seen), zero)]
        pad = [0.0] * (PUBLISHED_PAD[kind] - len(queries))  # at the end: feature i is the i-th token
        zs_cols = [f"L0_P_{kind}_p{i}_zs" for i in range(PUBLISHED_PAD[kind])]
        delta_cols = [f"L0_P_{kind}_p{i}_delta" for i in range(PUBLISHED_PAD[kind])]
        for k in (0, 1, 2):
            assert rows.loc[k, zs_cols].tolist() == pytest.approx(zero + pad, abs=1e-5), (kind, k)
            assert rows.loc[k, delta_cols].tolist() == pytest.approx(delta + pad, abs=1e-5), (kind, k)
    lonely_row = table[table.image_id == "z"]
    assert (lonely_row.filter(like="_delta") == 0).all().all()
    assert table.attrs["published_groups_without_kshot"] == ["z"] and table.attrs["published_vectors_cut"] == 0
    assert table.layout_prompt_tokens.tolist() == [len(_tokens(tok, p)) + 1 for p in answers.prompt]  # engine's BOS


def test_hooked_forward_equals_an_unhooked_one_without_bos(tmp_path):
    """On a real 2-shot prompt: the hook that stops after layer 0 gives what layer 0's full map gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memefx.icl.metagrad_features import prompt_record
    from tests.conftest import shared_file
    from tests.test_engine import _save_llama

    path = _save_llama(tmp_path / "llama", 32)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.bos_token = "[CLS]"  # a BOS the published form must not add
    prompt = pd.read_csv(shared_file("llm_answers.csv")).query("few_shot_num == 2").prompt.iloc[0]
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    offsets = [tuple(x) for x in enc.pop("offset_mapping")[0].tolist()]
    with torch.no_grad():
        layer0 = model(input_ids=enc["input_ids"], output_attentions=True).attentions[0][0]
    expected = reference_vectors(layer0, *span_masks(len(offsets), reference_spans(prompt, offsets)))
    record = prompt_record(model, tok, prompt, features="both")
    assert record["published"].keys() == expected.keys()
    for kind, vector in expected.items():
        assert len(vector) > 10 and torch.allclose(record["published"][kind], vector, atol=1e-6), kind
    assert record["tokens"] == len(offsets) + 1 and "L1_H0_cross" in record["ours"]  # ours: the engine's BOS


def test_notebook_split_sizes_and_scope():
    from memefx.icl.metagrad_protocol import grouped_split, row_split

    train, valid, test = row_split(792)
    assert (len(train), len(valid), len(test)) == (443, 111, 238)  # as the notebook printed for its 792 rows
    assert sorted([*train, *valid, *test]) == list(range(792))
    groups = np.repeat(np.arange(40), 5)
    train, valid, test = grouped_split(groups)
    assert not {*groups[test]} & {*groups[train], *groups[valid]} and not {*groups[train]} & {*groups[valid]}


def test_missing_extra_is_named_before_any_forward(tmp_path, monkeypatch):
    import sys

    from memefx.icl.metagrad_protocol import MissingExtraError, require_lightgbm
    from memefx.icl.metagrad_report import run_metagrad

    monkeypatch.setitem(sys.modules, "lightgbm", None)  # import lightgbm now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'memefx\[lightgbm\]'"):
        require_lightgbm()
    answers = tmp_path / "answers.csv"
    pd.DataFrame({"image_id": [1], "few_shot_num": [0], "prompt": [pair_prompt(TARGET)], "is_functional": [1],
                  "is_formatted": [1], "is_hateful": [0], "ground_truth": [0]}).to_csv(answers, index=False)
    with pytest.raises(MissingExtraError, match="--published_protocol false"):
        run_metagrad(answers, str(tmp_path / "no-model-needed"), tmp_path / "mg", features="published")
    assert not (tmp_path / "mg").exists()


def test_published_protocol_fits_the_tuned_lightgbm_on_shots_0_to_2():
    pytest.importorskip("lightgbm")
    pytest.importorskip("optuna")
    from memefx.icl.metagrad_protocol import published_protocol

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 4)
    shots = np.tile([0, 1, 2, 3], 60)
    x = rng.normal(size=(240, 3))
    y = (x[:, 0] + 0.3 * rng.normal(size=240) > 0).astype(int)
    result = published_protocol(x, y, shots, groups)
    assert result["rows"] == 180 and result["scope_shots"] == [0, 1, 2]  # 3-shot rows are out of scope
    assert (result["row_split"]["train"], result["row_split"]["valid"], result["row_split"]["test"]) == (100, 26, 54)
    assert result["row_split"]["auc"] > 0.9 and result["grouped_split"]["auc"] > 0.9
    assert "num_leaves" in result["row_split"]["params"]  # tuned by the stepwise search
    assert published_protocol(x, y, shots, groups) == result  # seeded: the same on a rerun
