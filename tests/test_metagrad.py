"""Meta-gradient pure parts: dual-form exactness, exact attention mass, spans on real prompts."""

from __future__ import annotations

import pandas as pd
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
