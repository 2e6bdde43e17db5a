"""Provenance, bit-identical reruns on the CPU, and `memefx report --compare`."""

from __future__ import annotations

import json
import shutil

import pytest

from memefx.cli import main
from memefx.data.datamodule import MemeDataModule
from memefx.provenance import data_fingerprint
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("reruns")
    config = tiny_config(tmp, tiny_root, midas=True)
    runs = {}
    for name, extra in (("a", []), ("b", []), ("seed", ["--seed_everything", "1", "--model.seed", "1"])):
        runs[name] = tmp / name
        main(["fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
              "--trainer.default_root_dir", str(runs[name]), *extra])
    return runs


@pytest.mark.slow  # shares three fits (about 40 s)
def test_provenance_records_config_versions_seeds_and_data(two_runs, tiny_root):
    record = json.loads((two_runs["a"] / "provenance.json").read_text())
    assert record["config"]["data"]["root"] == str(tiny_root)
    assert {"torch", "lightning", "transformers", "timm", "torchmetrics"} <= set(record["versions"])
    assert record["seeds"]["seed_everything"] == 0 and record["seeds"]["model"] == 0
    assert record["data"]["rows"]["train"] > 0 and "train.jsonl" in record["data"]["files"]
    assert record["trainer"]["world_size"] == 1


def test_fingerprint_changes_when_one_row_changes(tiny_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy)
    before = MemeDataModule(root=str(copy), image_size=32, vocab_size=512)
    before.setup("fit")
    fa = data_fingerprint(before)
    lines = (copy / "train.jsonl").read_text().splitlines()
    lines[5] = lines[5].replace('"text": "', '"text": "edited ')
    (copy / "train.jsonl").write_text("\n".join(lines) + "\n")
    after = MemeDataModule(root=str(copy), image_size=32, vocab_size=512)
    after.setup("fit")
    fb = data_fingerprint(after)
    assert fa["digest"] != fb["digest"] and fa["files"]["train.jsonl"] != fb["files"]["train.jsonl"]
    assert fa["files"]["dev_seen.jsonl"] == fb["files"]["dev_seen.jsonl"]


@pytest.mark.slow  # shares three fits (about 40 s)
def test_same_config_and_seed_give_identical_results(two_runs, capsys):
    assert main(["report", "--compare", str(two_runs["a"]), str(two_runs["b"]), "--atol", "0"]) == 0
    assert "0 result differences" in capsys.readouterr().out


@pytest.mark.slow  # shares three fits (about 40 s)
def test_changed_seed_is_reported_and_fails(two_runs, capsys):
    assert main(["report", "--compare", str(two_runs["a"]), str(two_runs["seed"])]) == 1
    out = capsys.readouterr().out
    assert "config seed_everything: 0 -> 1" in out and "config model.seed: 0 -> 1" in out
    assert "DIFFERS: metric val/auroc" in out or "DIFFERS: predictions/dev_seen.parquet" in out
