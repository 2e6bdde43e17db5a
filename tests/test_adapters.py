"""One contract test for every backbone adapter, plus region features from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memefx.attribution.masks import block_counts, block_sums
from memefx.cli import main
from memefx.data.collate import IMAGE, PAD, TEXT
from memefx.data.datamodule import MemeDataModule
from memefx.data.hmc import HMCFormatError
from memefx.models.backbones import build_backbone
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


def test_bottom_up_tsv_converts_to_region_files(tmp_path):
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
        main(["regions", "--tsv", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "npz2")])
