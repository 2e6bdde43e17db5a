"""One contract test for every backbone adapter, plus region features from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memefx.attribution.masks import block_counts, block_sums
from memefx.cli import main
from memefx.data.datamodule import MemeDataModule
from memefx.data.hmc import HMCFormatError
from memefx.models.backbones import build_backbone
from memefx.models.module import MemeClassifier
from memefx.schema import IMAGE, PAD, TEXT
from tests.test_cli import _tiny_config

SHAPE = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
VISUAL = {"image_encoder": "test_vit", "image_size": 32}
FAMILIES = {
    "visualbert": ({**SHAPE, **VISUAL}, {}),
    "uniter": ({**SHAPE, **VISUAL}, {}),
    "oscar": ({**SHAPE, **VISUAL}, {"tags_file": "truth.parquet"}),
    "caption_pair": (SHAPE, {"image_side": "caption"}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_contract(family, tiny_root, tmp_path):
    backbone_args, data_args = FAMILIES[family]
    dm = MemeDataModule(root=str(tiny_root), image_size=32, batch_size=4, vocab_size=512, max_length=40, **data_args)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    torch.manual_seed(0)
    backbone = build_backbone(family, **backbone_args)
    out = backbone(batch, output_attentions=True)
    t = out.segments.shape[1]
    assert out.logits.shape == (4, 2)
    assert torch.equal(out.segments[:, : batch["input_ids"].shape[1]], batch["segments"])  # text side as tokenized
    assert (out.segments == TEXT).any() and (out.segments == IMAGE).any()
    assert len(out.attentions) == backbone.num_layers
    assert all(a.shape == (4, backbone.num_heads, t, t) and a.requires_grad for a in out.attentions)
    grads = torch.autograd.grad(out.logits.softmax(-1)[:, 1].sum(), out.attentions)
    assert all(g.abs().sum() > 0 for g in grads)
    ones = torch.ones_like(out.attentions[0], dtype=torch.float64)
    assert torch.allclose(block_sums(ones, out.segments).sum(-1)[:, 0], ((out.segments != PAD).sum(-1) ** 2).double())
    assert torch.equal(block_sums(ones, out.segments)[:, 0], block_counts(out.segments))
    # fast_dev_run through the CLI
    config = _tiny_config(tmp_path, tiny_root, midas=True)
    main(["fit", "--config", str(config), "--model.backbone", family,
          "--model.backbone_args", str(backbone_args).replace("'", '"'), *sum((
              [f"--data.{k}", str(v)] for k, v in data_args.items()), []),
          "--data.max_length", "40", "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "predictions" / "dev_seen.parquet").is_file()


def _family_batch(family, tiny_root):
    backbone_args, data_args = FAMILIES[family]
    dm = MemeDataModule(root=str(tiny_root), image_size=32, batch_size=4, vocab_size=512, max_length=40, **data_args)
    dm.setup("validate")
    return backbone_args, next(iter(dm.val_dataloader()))


class _SDPACalls:
    """Counts calls of torch's scaled_dot_product_attention (the fast path) over sequences of length
    ``length`` (the timm image encoder calls it too, on its own shorter patch sequences)."""

    def __init__(self, monkeypatch):
        self.n, self.length = 0, None
        original = torch.nn.functional.scaled_dot_product_attention

        def counting(query, *args, **kwargs):
            self.n += query.shape[-2] == self.length
            return original(query, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)


@pytest.mark.slow  # about 30 s for oscar
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_paths_agree_and_checkpoints_do_not_depend_on_them(family, tiny_root, monkeypatch):
    """SDPA in forwards that capture nothing, eager only where attentions are asked for; same outputs,
    same gradients, same state dict."""
    backbone_args, batch = _family_batch(family, tiny_root)
    calls = _SDPACalls(monkeypatch)
    torch.manual_seed(0)
    fast = build_backbone(family, **backbone_args).eval()
    eager = build_backbone(family, **backbone_args, attn_implementation="eager").eval()
    assert fast.state_dict().keys() == eager.state_dict().keys()
    eager.load_state_dict(fast.state_dict(), strict=True)  # a checkpoint of either path loads into the other

    calls.length = fast(batch, output_attentions=True).segments.shape[1]
    logits = fast(batch).logits
    assert calls.n == fast.num_layers  # the fast path ran SDPA in every layer
    captured = fast(batch, output_attentions=True)
    assert calls.n == fast.num_layers  # the capturing forward ran eager only
    reference = eager(batch).logits
    assert calls.n == fast.num_layers  # attn_implementation="eager" never runs SDPA
    assert len(captured.attentions) == fast.num_layers and captured.attentions[0].requires_grad
    assert torch.allclose(logits, captured.logits, atol=1e-5) and torch.allclose(logits, reference, atol=1e-5)
    # after a capturing forward the model is back on its fast path
    fast(batch)
    assert calls.n == 2 * fast.num_layers

    # gradients of the parameters agree between the two paths (train mode without dropout)
    torch.manual_seed(1)
    no_dropout = {**backbone_args, "dropout": 0.0}
    a = build_backbone(family, **no_dropout).train()
    b = build_backbone(family, **no_dropout, attn_implementation="eager").train()
    b.load_state_dict(a.state_dict())
    grads = []
    for model, capture in ((a, False), (b, True)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(batch, output_attentions=capture).logits, batch["labels"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5, rtol=1e-4), name


def test_attention_path_is_restored_after_an_error(tiny_root):
    backbone_args, batch = _family_batch("caption_pair", tiny_root)
    backbone = build_backbone("caption_pair", **backbone_args)
    with pytest.raises(KeyError):
        backbone({k: v for k, v in batch.items() if k != "attention_mask"}, output_attentions=True)
    assert backbone.encoder.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"attn_implementation='flash'.*expected one of \('sdpa', 'eager'\)"):
        build_backbone("caption_pair", **backbone_args, attn_implementation="flash")


def test_classifier_checkpoint_loads_across_attention_paths(tiny_root, tmp_path):
    backbone_args, batch = _family_batch("visualbert", tiny_root)
    torch.manual_seed(0)
    fast = MemeClassifier(backbone="visualbert", backbone_args=backbone_args).eval()
    torch.save(fast.state_dict(), tmp_path / "weights.pt")
    eager = MemeClassifier(backbone="visualbert", backbone_args={**backbone_args, "attn_implementation": "eager"})
    eager.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True), strict=True)
    assert torch.allclose(fast(batch).logits, eager.eval()(batch).logits, atol=1e-5)


def _write_regions(folder, ids, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(ids):
        n = 3 + k % 4
        x1y1 = rng.uniform(0, 0.5, (n, 2))
        np.savez(folder / f"{i}.npz", features=rng.normal(size=(n, dim)).astype(np.float32),
                 boxes=np.concatenate([x1y1, x1y1 + 0.3], axis=1))


def test_region_features_from_disk(tiny_root, tmp_path):
    dm0 = MemeDataModule(root=str(tiny_root), image_side="caption")
    dm0.setup("fit")
    ids = sum((f.id.tolist() for f in dm0.frames.values()), [])
    _write_regions(tmp_path / "regions", ids)
    dm = MemeDataModule(root=str(tiny_root), image_side="regions", region_features=str(tmp_path / "regions"),
                        batch_size=4, vocab_size=512)
    dm.setup("validate")
    assert dm.region_dim == 16
    batch = next(iter(dm.val_dataloader()))
    assert batch["region_features"].shape[0] == 4 and batch["region_mask"].sum(1).min() >= 3
    backbone = build_backbone("uniter", **SHAPE, visual="regions", region_dim=16)
    out = backbone(batch, output_attentions=True)
    n_pad_regions = int((batch["region_mask"] == 0).sum())
    assert int((out.segments[:, batch["input_ids"].shape[1]:] == PAD).sum()) == n_pad_regions


def test_region_files_missing_or_misshapen(tiny_root, tmp_path):
    dm0 = MemeDataModule(root=str(tiny_root), image_side="caption")
    dm0.setup("validate")
    ids = dm0.frames["dev_seen"].id.tolist()
    _write_regions(tmp_path / "r", ids[1:])
    dm = MemeDataModule(root=str(tiny_root), image_side="regions", region_features=str(tmp_path / "r"))
    with pytest.raises(HMCFormatError, match=rf"1 memes have no region file <id>.npz \(ids {ids[0]}\)"):
        dm.setup("validate")
    np.savez(tmp_path / "r" / f"{ids[0]}.npz", features=np.zeros((3, 16)), boxes=np.zeros((2, 4)))
    with pytest.raises(HMCFormatError, match=rf"{ids[0]}.npz: features \(3, 16\) and boxes \(2, 4\)"):
        MemeDataModule(root=str(tiny_root), image_side="regions", region_features=str(tmp_path / "r")).setup("validate")
    np.savez(tmp_path / "r" / f"{ids[0]}.npz", features=np.zeros((3, 8)), boxes=np.zeros((3, 4)))
    with pytest.raises(HMCFormatError, match="feature sizes differ"):
        MemeDataModule(root=str(tiny_root), image_side="regions", region_features=str(tmp_path / "r")).setup("validate")


def test_bottom_up_tsv_converts_to_region_files(tmp_path, capsys):
    import base64

    from memefx.data.regions import check_regions, load_regions

    def b64(a):
        return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()

    rng = np.random.default_rng(0)
    rows = []
    for meme_id, n in (("01456", 3), ("42953", 5)):
        boxes = np.array([[10, 20, 110, 220]] * n, dtype=np.float32)
        feats = rng.normal(size=(n, 8)).astype(np.float32)
        rows.append("\t".join([meme_id, "400", "200", b64(np.arange(n, dtype=np.int64)), b64(np.ones(n, np.float32)),
                               b64(np.zeros(n, np.int64)), b64(np.ones(n, np.float32)), str(n), b64(boxes), b64(feats)]))
    (tmp_path / "feats.tsv").write_text("\n".join(rows) + "\n")
    assert main(["regions", "--tsv", str(tmp_path / "feats.tsv"), "--out", str(tmp_path / "npz")]) == 0
    assert check_regions(tmp_path / "npz", ["01456", "42953"]) == 8
    feats, boxes = load_regions(tmp_path / "npz", "42953")
    assert feats.shape == (5, 8) and torch.allclose(boxes[0], torch.tensor([0.05, 0.05, 0.55, 0.55]))
    (tmp_path / "bad.tsv").write_text(rows[0].replace("\t3\t", "\t4\t") + "\n")
    with pytest.raises(HMCFormatError, match=r"bad\.tsv:1: malformed region row"):
        main(["regions", "--tsv", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "npz2"), "--debug"])
    assert main(["regions", "--tsv", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "npz2")]) == 2
    assert "bad.tsv:1: malformed region row" in capsys.readouterr().err  # one line, no traceback
