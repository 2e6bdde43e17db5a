"""MIDAS maths without a Trainer: blocks, closed-form gradients, training-backward recovery, AttAttr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memefx.attribution.capture import active_hooks, attention_override
from memefx.attribution.integrated import integrated_attattr, quadrature
from memefx.attribution.masks import (
    BLOCKS,
    block_counts,
    block_masks,
    block_operators,
    block_sums,
    fused_block_sums,
)
from memefx.attribution.midas import (
    BackwardBlockReducer,
    loss_grad_factor,
    prob_grad_from_loss_grad,
    reduce_layers,
    sample_block_means,
    stratum_midas,
    target_classes,
    to_table,
)
from memefx.data.datamodule import MemeDataModule
from memefx.models.backbones import build_backbone
from memefx.schema import IMAGE, PAD, SPECIAL, TEXT
from tests.conftest import TINY_BACKBONE
from tests.toy_attention import ToyBackbone

SEGMENTS = torch.tensor([
    [SPECIAL, TEXT, TEXT, SPECIAL, IMAGE, IMAGE, IMAGE],
    [SPECIAL, TEXT, SPECIAL, PAD, PAD, IMAGE, IMAGE],
])


def _toy_batch():
    ids = torch.tensor([[1, 5, 6, 2, 9, 10, 11], [1, 7, 2, 0, 0, 12, 13]])
    return {"input_ids": ids, "attention_mask": (SEGMENTS != PAD).long(), "segments": SEGMENTS,
            "labels": torch.tensor([1, 0]), "ids": ["00001", "00002"]}


def test_blocks_partition_non_pad_entries_and_match_masks():
    scores = torch.rand(2, 3, 7, 7, dtype=torch.float64)
    masks = block_masks(SEGMENTS)
    nonpad = (SEGMENTS != PAD)[:, :, None] & (SEGMENTS != PAD)[:, None, :]
    assert torch.equal(masks.sum(1) == 1, nonpad) and not masks.sum(1).gt(1).any()  # a partition
    reference = torch.einsum("bhij,bkij->bhk", scores, masks.double())
    assert torch.allclose(block_sums(scores, SEGMENTS), reference)
    assert torch.equal(block_counts(SEGMENTS), masks.sum((-1, -2)).double())
    assert block_counts(SEGMENTS)[1].tolist() == [1, 4, 4, 16]  # 5 non-pad tokens, 25 entries; [SEP] counts as special, pads nowhere
    total = (scores * nonpad[:, None]).sum((-1, -2))
    assert torch.allclose(block_sums(scores, SEGMENTS).sum(-1), total)


def test_fused_block_sums_in_float32_match_the_float64_masks():
    scores = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    reference = torch.einsum("bhij,bkij->bhk", scores, block_masks(SEGMENTS).double())
    got = fused_block_sums(scores.float(), *block_operators(SEGMENTS, torch.float32))
    assert got.dtype == torch.float32 and torch.allclose(got.double(), reference, atol=1e-5)


def test_backward_reducer_equals_explicit_gradients_and_retains_nothing(tiny_root):
    torch.manual_seed(0)
    model = build_backbone("visualbert", **{**TINY_BACKBONE, "dropout": 0.0}).eval()
    batch = _tiny_batch(tiny_root)
    out = model(batch, output_attentions=True)
    loss = F.cross_entropy(out.logits, batch["labels"]) * 8.0  # as under an AMP loss scale of 8
    p_gold = out.logits.detach().softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    reducer = BackwardBlockReducer(out.attentions, out.segments)
    loss.backward()
    reducer.remove()
    assert not any(a.retains_grad for a in out.attentions)  # nothing retained
    assert active_hooks(model) == 0
    got = reducer.result(loss_grad_factor(p_gold, len(p_gold), loss_scale=8.0))
    out2 = model(batch, output_attentions=True)
    p = out2.logits.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    explicit = [torch.zeros_like(a) for a in out2.attentions]
    for b in range(len(p)):
        for layer, g in enumerate(torch.autograd.grad(p[b], out2.attentions, retain_graph=True)):
            explicit[layer][b] = g[b]
    reference = reduce_layers(out2.attentions, explicit, out2.segments)
    for score in ("attention", "gradient", "attattr"):
        scale = reference[score].abs().max()
        assert (got[score].double() - reference[score]).abs().max() <= 1e-5 * scale, score
    assert torch.equal(got["count"], reference["count"])


def test_backward_reducer_names_layers_without_gradient():
    model, batch = ToyBackbone(), _toy_batch()
    out = model(batch, output_attentions=True)
    detached = out.attentions[0].detach().requires_grad_(True)  # not in the graph of the logits
    reducer = BackwardBlockReducer([out.attentions[0], detached], batch["segments"])
    out.logits.softmax(-1)[:, 1].sum().backward()
    reducer.remove()
    with pytest.raises(RuntimeError, match=r"positions \[1\] got no gradient"):
        reducer.result()
    with pytest.raises(ValueError, match="scores"):
        BackwardBlockReducer(out.attentions, batch["segments"], scores=["saliency"])


def test_attribution_imports_neither_models_data_nor_lightning():
    """attribution/ is pure maths: it may be used without the training stack (DESIGN.md)."""
    import ast
    from pathlib import Path

    import memefx.attribution

    for path in Path(memefx.attribution.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("memefx.models", "memefx.data", "memefx.callbacks", "lightning",
                                            "pytorch_lightning")), f"{path.name} imports {name}"


def test_closed_form_gradient_of_hand_weighted_model():
    model, batch = ToyBackbone(), _toy_batch()
    out = model(batch, output_attentions=True)
    (grad,) = torch.autograd.grad(out.logits.softmax(-1)[:, 1].sum(), out.attentions)
    expected = model.closed_form_grad(batch)
    assert torch.allclose(grad, expected, atol=1e-7)
    reduced = reduce_layers(out.attentions, [grad], batch["segments"])
    att = out.attentions[0].detach().double()
    assert torch.allclose(reduced["gradient"][:, 0], block_sums(expected.double(), SEGMENTS), atol=1e-7)
    assert torch.allclose(reduced["attattr"][:, 0], block_sums(att * expected.double(), SEGMENTS), atol=1e-7)
    # each non-pad query row sums to 1 over the non-pad keys: the blocks hold one unit per non-pad token
    assert torch.allclose(reduced["attention"][:, 0, 0].sum(-1), (SEGMENTS != PAD).sum(-1).double())


def test_gradient_is_not_the_zero_gradient_of_a_summed_softmax():
    model, batch = ToyBackbone(), _toy_batch()
    out = model(batch, output_attentions=True)
    probs = out.logits.softmax(-1)
    (summed,) = torch.autograd.grad(probs.sum(), out.attentions, retain_graph=True)  # the reference defect
    (hateful,) = torch.autograd.grad(probs[:, 1].sum(), out.attentions, retain_graph=True)
    (benign,) = torch.autograd.grad(probs[:, 0].sum(), out.attentions)
    assert summed.abs().max() < 1e-6
    assert hateful.abs().max() > 1e-3
    assert torch.allclose(benign, -hateful) and not torch.allclose(benign, hateful)


def _tiny_batch(tiny_root):
    dm = MemeDataModule(root=str(tiny_root), image_size=32, batch_size=6, vocab_size=512)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("loss_scale,accumulate", [(1.0, 1), (1024.0, 1), (65536.0, 4)])
def test_training_backward_recovers_gold_probability_gradient(tiny_root, loss_scale, accumulate):
    torch.manual_seed(0)
    model = build_backbone("visualbert", **{**TINY_BACKBONE, "dropout": 0.0}).eval()
    batch = _tiny_batch(tiny_root)
    out = model(batch, output_attentions=True)
    for att in out.attentions:
        att.retain_grad()
    loss = F.cross_entropy(out.logits, batch["labels"]) / accumulate * loss_scale
    loss.backward()
    p_gold = out.logits.detach().softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    recovered = [prob_grad_from_loss_grad(a.grad, p_gold, len(p_gold), loss_scale, accumulate) for a in out.attentions]
    out2 = model(batch, output_attentions=True)
    p = out2.logits.softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
    for b in range(len(p)):
        explicit = torch.autograd.grad(p[b], out2.attentions, retain_graph=True)
        for layer, g in enumerate(explicit):
            got = recovered[layer][b]
            assert (got - g[b]).norm() <= 1e-5 * g[b].norm(), (b, layer)
            others = torch.cat([g[:b], g[b + 1:]])
            assert others.abs().max() == 0  # samples do not interact


def test_targets():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, -1])
    assert target_classes(probs, labels, "gold").tolist() == [1, 0, 0]
    assert target_classes(probs, labels, "pred").tolist() == [0, 1, 0]
    assert target_classes(probs, labels, "hateful").tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="target 'loss'"):
        target_classes(probs, labels, "loss")


def test_table_and_stratum_midas_against_pandas():
    rng = np.random.default_rng(0)
    reduced = {"attattr": rng.normal(size=(4, 2, 3, 4)), "count": rng.integers(1, 9, size=(4, 4)).astype(float)}
    ids = ["00001", "00002", "00003", "00004"]
    table = to_table(ids, reduced, epoch=2, stage="val", layers=[0, 5])
    assert len(table) == 4 * 2 * 3 * 4 and set(table.layer) == {0, 5} and (table.epoch == 2).all()
    row = table[(table.id == "00003") & (table.layer == 5) & (table["head"] == 2) & (table.block == "cross")].iloc[0]
    assert row["sum"] == reduced["attattr"][2, 1, 2, 2] and row["count"] == reduced["count"][2, 2]
    means = sample_block_means(table)
    expected = reduced["attattr"][1].sum((0, 1)) / (reduced["count"][1] * 6)
    assert np.allclose(means.loc["00002"].to_numpy(), expected)
    import pandas as pd

    members = pd.DataFrame({"id": ids, "stratum": [0, 0, 0, 1], "label": [1, 0, 0, 1]})
    strata = stratum_midas(means, members)
    assert list(strata.index) == [0]  # stratum 1 has no benign member
    assert np.allclose(strata.loc[0], means.loc["00001"] - means.loc[["00002", "00003"]].mean())
    assert list(strata.columns) == list(BLOCKS)


@pytest.mark.parametrize("rule,steps,tol", [pytest.param("riemann", 64, 2e-2, marks=pytest.mark.slow),  # about 40 s
                                            ("gauss", 16, 1e-3)])
def test_integrated_gradients_completeness(tiny_root, rule, steps, tol):
    torch.manual_seed(0)
    model = build_backbone("visualbert", **TINY_BACKBONE)
    batch = _tiny_batch(tiny_root)
    for layer in range(model.num_layers):
        res = integrated_attattr(model, batch, layer, steps=steps, rule=rule, chunk=32)
        gap = (res["f_full"] - res["f_zero"]).abs()
        assert (res["delta"].abs() <= tol * gap.clamp_min(1e-3) + 1e-6).all(), (res["delta"], gap)
        assert torch.allclose(res["block"].sum((1, 2)), res["total"], atol=1e-9)
    assert model.training  # mode restored
    assert active_hooks(model) == 0


def test_integrated_gradients_of_toy_model_match_numerical_integral():
    model, batch = ToyBackbone(), _toy_batch()
    res = integrated_attattr(model, batch, 0, steps=400, target="hateful", full=True)
    att = model(batch, output_attentions=True).attentions[0].detach().double()
    # independent: closed-form gradient at each alpha, averaged with the same midpoint-free Riemann rule
    alphas, weights = quadrature(400)
    with torch.no_grad():
        hidden = model.embed(batch["input_ids"])
        uv = (model.attn.value(hidden) @ model.u).double()
        integral = torch.zeros_like(att)
        for a, w in zip(alphas, weights):
            f = torch.sigmoid(a * (att[:, 0, 0] * uv).sum(-1))
            integral[:, 0, 0, :] += w * (f * (1 - f))[:, None] * uv
    assert torch.allclose(res["attr"], att * integral, atol=1e-9)


def test_override_hook_is_removed_after_an_exception():
    model = ToyBackbone()
    with pytest.raises(RuntimeError, match="boom"):
        with attention_override(model.attn, lambda a: a * 0.5):
            assert active_hooks(model) == 1
            raise RuntimeError("boom")
    assert active_hooks(model) == 0


def test_override_scales_only_the_chosen_layer(tiny_root):
    torch.manual_seed(0)
    model = build_backbone("visualbert", **TINY_BACKBONE).eval()
    batch = _tiny_batch(tiny_root)
    with torch.no_grad():
        base = model(batch, output_attentions=True)
        with attention_override(model.attention_modules()[1], lambda a: a * 0.5):
            scaled = model(batch, output_attentions=True)
    assert torch.allclose(scaled.attentions[0], base.attentions[0])
    assert torch.allclose(scaled.attentions[1], 0.5 * base.attentions[1])
    assert not torch.allclose(scaled.logits, base.logits)
