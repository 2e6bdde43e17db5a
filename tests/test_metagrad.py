"""Meta-gradient pure parts: dual-form exactness, exact attention mass, spans on real prompts."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from memefx.icl.metagrad import CAPTION, IMAGE, OTHER, attention_mass, dual_form, span_labels, target_spans
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


def test_metagrad_cli_end_to_end_on_tiny_llama(tmp_path):
    from memefx.cli import main

    path = _tiny_llama(tmp_path)
    answers = shared_file("llm_answers.csv")
    assert main(["icl", "metagrad", "--answers", str(answers), "--model", path, "--out", str(tmp_path / "mg"),
                 "--max-groups", "12"]) == 0
    features = pd.read_parquet(tmp_path / "mg" / "features.parquet")
    assert features.groupby("image_id").few_shot_num.nunique().max() > 1
    assert {"L0_H0_caption_caption_zs", "L1_H3_cross_delta", "L0_H0_dual_demo_answer"} <= set(features.columns)
    zero = features[features.few_shot_num == 0]
    assert (zero.filter(like="_delta") == 0).all().all()  # zero-shot rows have no delta
    report = (tmp_path / "mg" / "report.md").read_text()
    assert "is_functional" in report and "grouped AUC" in report
    assert "importance.png" in report and (tmp_path / "mg" / "importance.png").stat().st_size > 1000
