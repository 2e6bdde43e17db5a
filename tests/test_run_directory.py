"""The run directory has one owner: the same files from `memefx fit`, a user's LightningCLI and a plain
Trainer; earlier runs are never mixed in; checkpoints are verified; comparisons are right both ways."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from memefx.callbacks.run_directory import (
    ManifestCheckpointIO,
    RunDirectory,
    last_checkpoint,
    unique_ids,
    verify_checkpoint,
)
from memefx.causal.miate import miate
from memefx.cli import main
from memefx.data.datamodule import MemeDataModule
from memefx.errors import UserError
from memefx.models.module import MemeClassifier, coerce_backbone_args
from memefx.report.compare import compare_runs
from tests.conftest import tiny_config

FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2"]
# what every entry point must leave in the folder
CORE = {"config.yaml", "provenance.json", "metrics.json", "predictions/dev_seen.parquet", "miate/dev_seen.json"}


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _tiny(tmp_path, root):
    cfg = yaml.safe_load(tiny_config(tmp_path, root).read_text())
    return cfg["model"], cfg["data"]


# ------------------------------------------------------------------------------------ three entry points
@pytest.mark.slow  # three fits: about 40 s
def test_plain_trainer_and_user_cli_write_the_same_folder_as_memefx_fit(tmp_path, tiny_root):
    model_cfg, data_cfg = _tiny(tmp_path, tiny_root)

    fit_run = tmp_path / "memefx_fit"
    assert main(["fit", "--config", str(tiny_config(tmp_path, tiny_root)), *FAST,
                 "--trainer.default_root_dir", str(fit_run)]) == 0

    plain_run = tmp_path / "plain"
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, default_root_dir=plain_run,
                        callbacks=[RunDirectory()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(MemeClassifier(**model_cfg), datamodule=MemeDataModule(**data_cfg))

    from lightning.pytorch.cli import LightningCLI

    user_run = tmp_path / "user_cli"
    LightningCLI(MemeClassifier, MemeDataModule, save_config_callback=None,
                 trainer_defaults={"callbacks": [RunDirectory()], "logger": False},
                 args=["fit", "--config", str(tiny_config(tmp_path, tiny_root)), *FAST,
                       "--trainer.default_root_dir", str(user_run), "--trainer.logger", "false"])

    for run in (fit_run, plain_run, user_run):
        assert CORE <= _files(run), (run, sorted(_files(run)))
        provenance = json.loads((run / "provenance.json").read_text())
        assert provenance["data"]["tables"]["confounders"].endswith("confounders.parquet")
        assert "val/auroc" in json.loads((run / "metrics.json").read_text())
    saved = yaml.safe_load((plain_run / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "visualbert" and saved["data"]["root"] == str(tiny_root)


# -------------------------------------------------------------------------------- refusing to mix runs
@pytest.mark.slow  # several fits: about 45 s
def test_second_fit_is_refused_and_overwrite_clears(tmp_path, tiny_root, capsys):
    config = str(tiny_config(tmp_path, tiny_root))
    run = tmp_path / "run"
    assert main(["fit", "--config", config, *FAST, "--trainer.default_root_dir", str(run)]) == 0
    before = (run / "provenance.json").read_bytes()
    assert main(["fit", "--config", config, *FAST, "--trainer.default_root_dir", str(run),
                 "--model.seed", "5"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "provenance.json").read_bytes() == before  # nothing of the refused fit was written
    (run / "predictions" / "test_seen.parquet").write_bytes(b"stale")  # an old run's test file
    assert main(["fit", "--config", config, *FAST, "--trainer.default_root_dir", str(run),
                 "--overwrite", "true"]) == 0
    assert not (run / "predictions" / "test_seen.parquet").exists()


def test_failing_fit_writes_nothing(tmp_path, tiny_root, capsys):
    run = tmp_path / "run"
    code = main(["fit", "--config", str(tiny_config(tmp_path, tiny_root)), *FAST,
                 "--trainer.default_root_dir", str(run), "--model.lr", "-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("memefx: error:") and "Traceback" not in err
    assert not (run / "config.yaml").exists() and not (run / "provenance.json").exists()


# ---------------------------------------------------------------------------------------- checkpoints
def _save(io: ManifestCheckpointIO, path: Path, epoch: int, step: int) -> None:
    io.save_checkpoint({"epoch": epoch, "global_step": step, "state_dict": {"w": torch.arange(4.0)}}, path)


def test_manifest_verifies_checkpoints_and_resolves_last_by_step(tmp_path):
    from lightning.fabric.plugins import TorchCheckpointIO

    folder = tmp_path / "run" / "checkpoints"
    io = ManifestCheckpointIO(TorchCheckpointIO())
    _save(io, folder / "last.ckpt", epoch=0, step=10)
    _save(io, folder / "last-v1.ckpt", epoch=1, step=20)
    assert io.load_checkpoint(folder / "last-v1.ckpt")["global_step"] == 20
    # `cp -r` gives every file a new time; "last" still means the highest recorded step
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    (copy / "checkpoints" / "last.ckpt").touch()
    assert last_checkpoint(copy) == copy / "checkpoints" / "last-v1.ckpt"
    # a zeroed 4 KiB block is caught before the weights are loaded
    data = bytearray((folder / "last.ckpt").read_bytes())
    data[64:64 + 4096] = bytes(min(4096, len(data) - 64))
    (folder / "last.ckpt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum differs"):
        io.load_checkpoint(folder / "last.ckpt")
    verify_checkpoint(folder / "last-v1.ckpt")  # the intact one passes
    io.remove_checkpoint(folder / "last-v1.ckpt")
    assert "last-v1.ckpt" not in json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow  # about 22 s
def test_resume_with_corrupt_checkpoint_is_an_error(tmp_path, tiny_root, capsys):
    config = str(tiny_config(tmp_path, tiny_root, callbacks=["checkpoint_every_3_steps"]))
    run = tmp_path / "run"
    assert main(["fit", "--config", config, *FAST, "--trainer.default_root_dir", str(run)]) == 0
    last = last_checkpoint(run)
    assert last is not None
    data = bytearray(last.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    last.write_bytes(bytes(data))
    code = main(["fit", "--config", config, *FAST, "--trainer.max_epochs", "2",
                 "--trainer.default_root_dir", str(run), "--ckpt_path", "last"])
    assert code == 2 and "checksum differs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- compare
def _fake_run(folder: Path, p: list[float], empty_kind: bool = True) -> Path:
    (folder / "predictions").mkdir(parents=True)
    (folder / "miate").mkdir()
    pd.DataFrame({"id": ["00001", "00002", "00003", "00004"], "label": [1, 0, 1, 0], "p_hateful": p}).to_parquet(
        folder / "predictions" / "dev_seen.parquet", index=False)
    rows = pd.DataFrame({"id": [1, 2, 3, 4], "stratum": [0, 0, 1, 1], "label": [1, 0, 1, 0], "p": p})
    empty = rows.iloc[:0]
    result = {"split": "dev_seen", "shared_image": miate(rows, n_bootstrap=20),
              "shared_text": miate(empty if empty_kind else rows, n_bootstrap=20)}
    (folder / "miate" / "dev_seen.json").write_text(json.dumps(result))
    (folder / "metrics.json").write_text(json.dumps({"val/auroc": 1.0, "val/miate_shared_text": float("nan")}))
    return folder


def test_compare_equal_runs_with_an_empty_kind(tmp_path):
    p = [0.9, 0.1, 0.8, 0.3]
    a, b = _fake_run(tmp_path / "a", p), _fake_run(tmp_path / "b", p)
    assert compare_runs(a, b, atol=0, rtol=0) == ([], [])
    assert set(json.loads((a / "miate" / "dev_seen.json").read_text())["shared_text"]) == set(
        json.loads((a / "miate" / "dev_seen.json").read_text())["shared_image"])


def test_compare_sees_files_only_in_b_and_one_ulp(tmp_path):
    p = [0.9, 0.1, 0.8, 0.3]
    a = _fake_run(tmp_path / "a", p)
    b = _fake_run(tmp_path / "b", [np.nextafter(0.9, 1.0), 0.1, 0.8, 0.3])
    pd.DataFrame({"id": ["00001"], "label": [-1], "p_hateful": [0.5]}).to_parquet(
        b / "predictions" / "test_unseen.parquet", index=False)
    (b / "midas").mkdir()
    pd.DataFrame({"id": ["00001"], "layer": [0], "head": [0], "block": ["text"], "score": ["attattr"],
                  "sum": [1.0]}).to_parquet(b / "midas" / "val_epoch0.parquet", index=False)
    _, results = compare_runs(a, b, atol=0, rtol=0)
    text = "\n".join(results)
    assert "predictions/test_unseen.parquet: only in B" in text
    assert "midas/val_epoch0.parquet: only in B" in text
    assert "predictions/dev_seen.parquet: max |p_hateful difference|" in text
    assert compare_runs(a, b, atol=1e-6, rtol=0)[1] == [r for r in results if "only in B" in r]


# ----------------------------------------------------------------------------------- pure helpers
def test_unique_ids_drops_identical_repeats_and_refuses_conflicts():
    frame = pd.DataFrame({"id": ["1", "2", "2"], "label": [0, 1, 1], "p_hateful": [0.1, 0.7, 0.7]})
    assert unique_ids(frame, "x").id.tolist() == ["1", "2"]
    with pytest.raises(RuntimeError, match="different values"):
        unique_ids(frame.assign(p_hateful=[0.1, 0.7, 0.6]), "x")


def test_backbone_args_from_the_command_line_are_typed():
    args = coerce_backbone_args("visualbert", {"hidden_size": "64", "num_layers": "2", "image_encoder": "test_vit"})
    assert args == {"hidden_size": 64, "num_layers": 2, "image_encoder": "test_vit"}
    with pytest.raises(UserError, match="unknown keys \\['hiden_size'\\]"):
        coerce_backbone_args("visualbert", {"hiden_size": 64})
    with pytest.raises(UserError, match="hidden_size='big'"):
        coerce_backbone_args("visualbert", {"hidden_size": "big"})


def test_cli_override_of_backbone_args(tmp_path, tiny_root, monkeypatch):
    """``--model.backbone_args.hidden_size 16`` reaches the built backbone (the YAML says 32), typed as int."""
    import memefx.models.module as module

    built = []
    original = module.build_backbone
    monkeypatch.setattr(module, "build_backbone", lambda name, **kw: built.append((kw, original(name, **kw))) or built[-1][1])
    run = tmp_path / "run"
    assert main(["fit", "--config", str(tiny_config(tmp_path, tiny_root)), *FAST, "--trainer.default_root_dir",
                 str(run), "--model.backbone_args.hidden_size", "16", "--trainer.limit_val_batches", "0"]) == 0
    kwargs, backbone = built[-1]
    assert kwargs["hidden_size"] == 16 and kwargs["num_layers"] == 2  # the override, the rest from the YAML
    assert backbone.encoder.config.hidden_size == 16
    assert backbone.encoder.embeddings.word_embeddings.weight.shape[1] == 16
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["backbone_args"]["hidden_size"] == 16


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a memefx run directory" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_torn_json_names_the_file(tmp_path, capsys):
    run = _fake_run(tmp_path / "a", [0.9, 0.1, 0.8, 0.3])
    (run / "metrics.json").write_text('{"val/auroc": 0.9')
    assert main(["report", str(run)]) == 2
    assert f"{run / 'metrics.json'}: not valid JSON" in capsys.readouterr().err


def test_wandb_logger_without_wandb_says_what_to_install(tmp_path, tiny_root, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["fit", "--config", str(tiny_config(tmp_path, tiny_root)), "--config",
                 str(Path(__file__).resolve().parents[1] / "configs" / "logger" / "wandb.yaml"),
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    assert code == 2 and "pip install 'memefx[wandb]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ unlabeled / one class
def _eval_splits_root(tmp_path: Path, tiny_root: Path) -> Path:
    """tiny_root with a one-class test_seen and an unlabeled test_unseen (as users receive test files)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    rows = [json.loads(line) for line in (root / "test_seen.jsonl").read_text().splitlines()]
    (root / "test_seen.jsonl").write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows))
    conf = pd.read_parquet(root / "confounders.parquet")
    conf.loc[conf.split == "test_seen", "label"] = 0
    conf.to_parquet(root / "confounders.parquet", index=False)
    unlabeled = [{k: v for k, v in r.items() if k != "label"} | {"id": "9" + str(r["id"]).zfill(5)[1:]} for r in rows]
    (root / "test_unseen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unlabeled))
    return root


@pytest.mark.slow  # about 25 s
def test_unlabeled_and_one_class_splits_get_predictions_not_made_up_metrics(tmp_path, tiny_root, caplog):
    root = _eval_splits_root(tmp_path, tiny_root)
    run = tmp_path / "run"
    assert main(["fit", "--config", str(tiny_config(tmp_path, root)), "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "2", "--trainer.default_root_dir", str(run),
                 "--data.test_split", "[dev_seen, test_seen, test_unseen]", "--test_after_fit", "true"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/dev_seen/auroc" in metrics
    assert not any(k.startswith(("test/test_seen/auroc", "test/test_unseen/")) for k in metrics), metrics
    assert "test/test_seen/acc" not in metrics  # one class: no AUROC, and no accuracy beside it either
    unlabeled = pd.read_parquet(run / "predictions" / "test_unseen.parquet")
    assert len(unlabeled) == len((root / "test_unseen.jsonl").read_text().splitlines())
    assert (unlabeled.label == -1).all() and unlabeled.p_hateful.between(0, 1).all()
    assert json.loads((run / "miate" / "test_unseen.json").read_text())["shared_image"]["n_strata"] == 0
    said = caplog.text
    assert "'test_unseen' has no labels" in said and "'test_seen' has one class only" in said


def test_compare_tolerates_rounding_in_proportion_to_the_midas_scale(tmp_path):
    """Only the thread count differs: MIDAS sums of size ~10 move by ~4e-6. Equal at the default tolerance,
    different when bit-identity is asked for, and a real difference is still found."""
    p = [0.9, 0.1, 0.8, 0.3]
    a, b = _fake_run(tmp_path / "a", p), _fake_run(tmp_path / "b", p)
    for folder, shift in ((a, 0.0), (b, 3.8e-6)):
        (folder / "midas").mkdir()
        pd.DataFrame({"id": ["00001", "00002"], "layer": 0, "head": 0, "block": "text", "score": "attattr",
                      "sum": [12.5 + shift, -3.0]}).to_parquet(folder / "midas" / "val_epoch0.parquet", index=False)
    assert compare_runs(a, b)[1] == []
    assert any("attattr max |sum difference| 3.8e-06" in r for r in compare_runs(a, b, atol=1e-6, rtol=0)[1])
    (b / "midas" / "val_epoch0.parquet").unlink()
    pd.DataFrame({"id": ["00001", "00002"], "layer": 0, "head": 0, "block": "text", "score": "attattr",
                  "sum": [12.6, -3.0]}).to_parquet(b / "midas" / "val_epoch0.parquet", index=False)
    assert compare_runs(a, b)[1]


def test_run_files_are_strict_json(tmp_path, tiny_root):
    """A kind without strata or a one-class split gives undefined figures: null in the files, never a bare
    NaN token that jq or JavaScript refuse."""
    run = tmp_path / "run"
    assert main(["fit", "--config", str(tiny_config(tmp_path, tiny_root)), *FAST, "--trainer.default_root_dir",
                 str(run)]) == 0
    for path in [*run.glob("*.json"), *(run / "miate").glob("*.json")]:
        json.loads(path.read_text(), parse_constant=lambda c, name=path.name: pytest.fail(f"{name}: bare {c}"))
