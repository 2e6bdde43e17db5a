"""Measured like a study: a validation split carved from train (grouped, seeded), selection that never reads
the evaluation splits, pooling options, and the summary over seeds."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import memefx.data.hmc as hmc
from memefx.cli import main
from memefx.data.carve import anchor_components, carve_validation
from memefx.data.datamodule import MemeDataModule
from memefx.data.tables import read_confounders
from memefx.models.backbones.encoder import pool
from memefx.models.module import MemeClassifier
from memefx.report.study import hierarchical_bootstrap, summarize_study
from memefx.schema import KIND_COLUMN
from tests.conftest import TINY_BACKBONE, tiny_config


def _train(tiny_root):
    conf = read_confounders(tiny_root / "confounders.parquet")
    return conf, conf[conf.split == "train"].id.reset_index(drop=True)


def test_carved_split_is_grouped_and_seeded(tiny_root):
    conf, ids = _train(tiny_root)
    held, record = carve_validation(ids, conf, "train", 0.2, seed=3)
    again, _ = carve_validation(ids, conf, "train", 0.2, seed=3)
    other, _ = carve_validation(ids, conf, "train", 0.2, seed=4)
    assert np.array_equal(held, again) and not np.array_equal(held, other)
    assert 0.1 < held.mean() < 0.35 and record["memes"] == held.sum() and record["of"] == len(ids)
    side = dict(zip(ids, held))
    rows = conf[conf.split == "train"]
    for column in KIND_COLUMN.values():  # no anchor has members on both sides, of either kind
        grouped = rows[rows[column].notna()].groupby(column).id.apply(lambda s: {side[i] for i in s})
        assert grouped.map(len).max() == 1
    assert any(len(s) > 1 for s in rows[rows.img_org_id.notna()].groupby("img_org_id").id.apply(list))


def test_components_link_both_kinds_transitively():
    conf = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "split": "train", "label": [1, 0, 0, 1, 0],
                         "img_org_id": ["a", "a", None, "d", None], "txt_org_id": [None, "c", "c", None, None]})
    labels = anchor_components(conf.id, conf, "train")
    assert labels[0] == labels[1] == labels[2]  # a-b share a picture, b-c a text
    assert len({labels[0], labels[3], labels[4]}) == 3
    assert len(set(anchor_components(conf.id, None, "train"))) == 5  # no table: every meme alone
    with pytest.raises(ValueError, match=r"val_from_train=1.5: expected a fraction"):
        carve_validation(conf.id, conf, "train", 1.5)


def test_validation_comes_from_train_and_is_recorded(tiny_root):
    dm = MemeDataModule(root=str(tiny_root), image_size=32, vocab_size=512, batch_size=16, val_from_train=0.2)
    dm.setup("fit")
    assert dm.eval_splits("val") == ["train_heldout"] and "dev_seen" not in dm.frames
    held, train = set(dm.frames["train_heldout"].id), set(dm.frames["train"].id)
    assert held and not held & train
    assert next(iter(dm.val_dataloader()))["split"] == "train_heldout"
    assert dm.carved["memes"] == len(held) and dm.carved["seed"] == 0
    with pytest.raises(ValueError, match="choose one"):
        MemeDataModule(root=str(tiny_root), val_split="dev_seen", val_from_train=0.1)


def _fit_best(tmp_path, root, monkeypatch):
    """Fit with the carved validation split; returns the best score and the splits read from disk."""
    read = []
    original = hmc.read_split
    monkeypatch.setattr(hmc, "read_split", lambda path, split=None: read.append(split or path.stem) or original(path, split))
    torch.manual_seed(0)
    dm = MemeDataModule(root=str(root), image_size=32, vocab_size=512, batch_size=32, val_from_train=0.2)
    model = MemeClassifier(backbone_args=TINY_BACKBONE, miate_bootstrap=10, lr=3e-3)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/auroc", mode="max")
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint])
    trainer.fit(model, datamodule=dm)
    return float(checkpoint.best_model_score), checkpoint.best_model_path, set(read)


def test_selection_never_reads_dev_seen(tmp_path, tiny_root, monkeypatch):
    """A signal planted in dev_seen only (its labels inverted) changes nothing the fit chooses."""
    best, path, read = _fit_best(tmp_path / "a", tiny_root, monkeypatch)
    assert "dev_seen" not in read and "train" in read
    planted = tmp_path / "planted"
    planted.mkdir()
    for item in tiny_root.iterdir():
        (planted / item.name).symlink_to(item)
    (planted / "dev_seen.jsonl").unlink()
    lines = [json.loads(x) for x in (tiny_root / "dev_seen.jsonl").read_text().splitlines()]
    (planted / "dev_seen.jsonl").write_text("".join(json.dumps({**x, "label": 1 - x["label"]}) + "\n" for x in lines))
    best_planted, path_planted, _ = _fit_best(tmp_path / "b", planted, monkeypatch)
    assert best_planted == best and path_planted.rsplit("/", 1)[1] == path.rsplit("/", 1)[1]


def test_mean_pooling_averages_the_non_padding_states():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))


def _fake_run(folder, seed, splits, metrics, strata):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "provenance.json").write_text("{}")
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"test_split": splits}}))
    (folder / "miate").mkdir()
    for split in splits:
        result = {"split": split}
        for kind, values in strata[split].items():
            result[kind] = {"mean": float(np.mean(values)), "strata": [{"miate": v} for v in values]}
        (folder / "miate" / f"{split}.json").write_text(json.dumps(result))


def test_study_summary_equals_pandas_over_the_seed_runs(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(3):
        strata = {s: {"shared_image": rng.normal(0.3, 0.1, 12).tolist(), "shared_text": rng.normal(0.1, 0.1, 9).tolist()}
                  for s in ("dev_seen", "dev_unseen")}
        metrics = {f"test/{s}/auroc": float(rng.uniform(0.7, 0.8)) for s in ("dev_seen", "dev_unseen")}
        metrics |= {f"test/{s}/acc": float(rng.uniform(0.6, 0.7)) for s in ("dev_seen", "dev_unseen")}
        _fake_run(tmp_path / f"seed{seed}", seed, ["dev_seen", "dev_unseen"], metrics, strata)
    (tmp_path / "seed9").mkdir()  # unfinished: no metrics.json, left out
    summary = summarize_study(tmp_path, n_bootstrap=300)
    assert summary["seeds"] == [0, 1, 2]
    table = pd.read_csv(tmp_path / "study.csv")
    runs = {s: json.loads((tmp_path / f"seed{s}" / "metrics.json").read_text()) for s in range(3)}
    for split in ("dev_seen", "dev_unseen"):
        auroc = pd.Series([runs[s][f"test/{split}/auroc"] for s in range(3)])
        got = summary["splits"][split]
        assert got["auroc"]["mean"] == pytest.approx(auroc.mean()) and got["auroc"]["std"] == pytest.approx(auroc.std())
        means = {k: pd.Series([np.mean([r["miate"] for r in json.loads((tmp_path / f"seed{s}" / "miate" / f"{split}.json")
                                                                        .read_text())[k]["strata"]]) for s in range(3)])
                 for k in ("shared_image", "shared_text")}
        for kind, series in means.items():
            m = got["miate"][kind]
            assert m["mean"] == pytest.approx(series.mean()) and m["ci_low"] < m["mean"] < m["ci_high"]
            assert table[table.split == split][f"miate_{kind}"].tolist() == pytest.approx(series.tolist())
        diff = got["image_minus_text"]
        assert diff["mean"] == pytest.approx((means["shared_image"] - means["shared_text"]).mean())
        assert diff["ci_low"] < diff["mean"] < diff["ci_high"] and diff["ci_low"] > 0  # 0.3 vs 0.1 planted


def test_hierarchical_bootstrap_widens_with_seed_variation():
    strata = [np.full(20, 0.2) + np.linspace(-0.01, 0.01, 20)]
    one_seed = hierarchical_bootstrap(strata * 3, n_bootstrap=500)
    spread = hierarchical_bootstrap([strata[0] - 0.1, strata[0], strata[0] + 0.1], n_bootstrap=500)
    assert np.ptp(one_seed) < 0.02 < np.ptp(spread)


def test_study_command_runs_seeds_and_reports(tmp_path, tiny_root, capsys):
    """The README's chain: memefx study --config C --seeds 0,1 --out DIR, then memefx report DIR."""
    config = tiny_config(tmp_path, tiny_root)
    out = tmp_path / "study"
    assert main(["study", "--config", str(config), "--seeds", "0,1", "--out", str(out), "--trainer.max_epochs", "1",
                 "--test_after_fit", "true", "--data.val_from_train", "0.2", "--data.test_split", "[dev_seen,test_seen]",
                 "--n-bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "dev_seen: AUROC" in printed and "image - text" in printed
    summary = json.loads((out / "study.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["splits"]) == {"dev_seen", "test_seen"}
    first = json.loads((out / "seed0" / "metrics.json").read_text())
    assert summary["splits"]["dev_seen"]["auroc"]["per_seed"][0] == pytest.approx(first["test/dev_seen/auroc"])
    provenance = json.loads((out / "seed1" / "provenance.json").read_text())
    assert provenance["seeds"]["model"] == 1 and provenance["data"]["val_from_train"]["fraction"] == 0.2
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "study.png").is_file()
    assert main(["study", "--out", str(out), "--summarize-only", "--seeds", "3"]) == 2  # fits nothing: refused


@pytest.mark.slow  # spawns processes
def test_slurm_array_script_runs_one_seed_per_task(tmp_path, tiny_root):
    """scripts/slurm/study.sbatch as two array tasks would run it, then the summary job's command."""
    import os
    import subprocess
    import sys

    config = tiny_config(tmp_path, tiny_root)
    out = tmp_path / "study"
    env = {**os.environ, "TRAINER_CONFIG": "configs/trainer/cpu.yaml", "MEMEFX": f"{sys.executable} -m memefx.cli"}
    for task in ("0", "1"):
        done = subprocess.run(["bash", "scripts/slurm/study.sbatch", str(config), str(out), "--trainer.max_epochs", "1",
                               "--test_after_fit", "true", "--data.val_from_train", "0.2"],
                              env={**env, "SLURM_ARRAY_TASK_ID": task}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / "study.json").exists()  # the tasks only fit
    assert main(["study", "--out", str(out), "--summarize-only", "--n-bootstrap", "50"]) == 0
    assert json.loads((out / "study.json").read_text())["seeds"] == [0, 1]
