"""Run folders that only their own run writes (issue 23): a foreign checkpoint, a second fit at once, a resume
with changed settings and a bad split are refused before anything is written; later stages add their metrics
beside the fit's; ``best``/``last`` resolve in a new process; every evaluation says which weights it saw; the
post-fit validation is not logged as one more epoch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from memefx.callbacks.run_directory import FolderLock, best_checkpoint, last_checkpoint, resume_differences
from memefx.cli import main
from memefx.report.compare import compare_runs
from tests.conftest import free_port, tiny_config

FAST = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"]
BEST = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/auroc", "mode": "max", "save_last": True, "filename": "best"}}


def _config(tmp_path: Path, root: Path, checkpoint: bool = True) -> Path:
    """tests/conf/tiny.yaml with the experiments' ModelCheckpoint (best on val/auroc, and last)."""
    path = tiny_config(tmp_path, root)
    cfg = yaml.safe_load(path.read_text())
    if checkpoint:
        cfg["trainer"]["callbacks"] = [BEST]
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_root) -> tuple[Path, Path]:
    """(config, run): a 2-epoch fit with the best checkpoint tested after it, as the experiment configs do."""
    tmp = tmp_path_factory.mktemp("finished")
    config = _config(tmp, tiny_root)
    run = tmp / "run"
    assert main(["fit", "--config", str(config), *FAST, "--trainer.max_epochs", "2", "--test_after_fit", "true",
                 "--trainer.default_root_dir", str(run)]) == 0
    return config, run


@pytest.fixture
def copy(finished, tmp_path) -> tuple[Path, Path]:
    config, run = finished
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return config, target


# ------------------------------------------------------------------------ 1. another run's checkpoint
def test_resuming_another_runs_checkpoint_into_a_finished_run_is_refused(copy, finished, tmp_path, capsys):
    config, run = copy
    other = last_checkpoint(finished[1])
    before = _snapshot(run)
    code = main(["fit", "--config", str(config), *FAST, "--trainer.max_epochs", "3", "--ckpt_path", str(other),
                 "--trainer.default_root_dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and f"--ckpt_path {other} is not one of its checkpoints" in err, err
    assert _snapshot(run) == before


# --------------------------------------------------------------------------- 2. two fits at once
def test_a_fit_into_a_folder_in_use_is_refused(copy, tmp_path, capsys):
    config, run = copy
    lock = FolderLock(run)
    lock.acquire("another memefx fit")
    try:
        before = _snapshot(run)
        # a resume passes the "holds a run" check: only the lock stops it
        code = main(["fit", "--config", str(config), *FAST, "--trainer.max_epochs", "3", "--ckpt_path", "last",
                     "--trainer.default_root_dir", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and f"run directory {run} is in use (another memefx fit: pid {os.getpid()}" in err, err
        assert _snapshot(run) == before
        # an evaluation writes the folder too
        assert main(["test", "--config", str(config), *FAST, "--ckpt_path", "best",
                     "--trainer.default_root_dir", str(run)]) == 2
        assert "is in use" in capsys.readouterr().err
        assert _snapshot(run) == before
    finally:
        lock.release()
    again = FolderLock(run)
    again.acquire("the lock is free again")  # the refused commands released what they took
    again.release()


@pytest.mark.slow  # spawns two DDP processes (about 40 s)
def test_ddp_ranks_stop_together_on_a_folder_in_use(finished, tmp_path):
    config, _ = finished
    run = tmp_path / "run"
    lock = FolderLock(run)
    lock.acquire("another memefx fit")
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        done = subprocess.run([sys.executable, "-m", "memefx.cli", "fit", "--config", str(config), *FAST,
                               "--trainer.max_epochs", "1", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                               "--trainer.default_root_dir", str(run)],
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "is in use" in done.stderr
    assert set(_snapshot(run)) == {".memefx.lock"}  # both ranks stopped before writing (the logger's empty folder)


@pytest.mark.slow  # two fits in two processes at once (about 40 s)
def test_two_fits_started_at_once_leave_one_run(finished, tmp_path):
    config, _ = finished
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "memefx.cli", "fit", "--config", str(config), *FAST, "--trainer.max_epochs", "2",
           "--trainer.default_root_dir", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([*cmd, "--model.seed", str(seed)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert "is in use" in refused or "already holds a run" in refused
    from memefx.provenance import file_digest

    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())
    assert {name: e["sha256"] for name, e in manifest.items()} == {
        name: file_digest(run / "checkpoints" / name) for name in manifest}
    winner = [1, 2][[p.returncode for p in procs].index(0)]
    assert json.loads((run / "provenance.json").read_text())["seeds"]["model"] == winner


# ------------------------------------------------------------------ 4. stages add, never remove
def test_validate_and_test_add_their_metrics_beside_the_fits(copy, finished, capsys):
    config, run = copy
    fit_metrics = (run / "metrics.json").read_bytes()
    assert {"train/loss", "val/auroc", "test/auroc"} <= set(json.loads(fit_metrics))
    for stage in ("validate", "test"):
        assert main([stage, "--config", str(config), *FAST, "--ckpt_path", "best",
                     "--trainer.default_root_dir", str(run)]) == 0
        assert (run / "metrics.json").read_bytes() == fit_metrics  # the fit's metrics, untouched
    validated = json.loads((run / "metrics_validate.json").read_text())
    tested = json.loads((run / "metrics_test.json").read_text())
    assert "val/auroc" in validated and not any(k.startswith(("train/", "test/")) for k in validated)
    assert "test/auroc" in tested and not any(k.startswith(("train/", "val/")) for k in tested)
    out = capsys.readouterr().out
    assert f"memefx [{run / 'metrics_test.json'}] (checkpoint {run / 'checkpoints' / 'best.ckpt'}" in out
    assert main(["report", str(run)]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "`memefx test` on checkpoint" in report and "(metrics_validate.json)" in report
    _, results = compare_runs(finished[1], run)
    assert "metrics_validate.json: only in B" in results and "metrics_test.json: only in B" in results


# ----------------------------------------------------------------- 5./6. which weights, in a new process
def test_best_and_last_resolve_from_the_manifest_in_a_new_process(copy):
    config, run = copy
    best = best_checkpoint(run)
    assert best == run / "checkpoints" / "best.ckpt"
    for name, expected in (("best", best), ("last", last_checkpoint(run))):
        assert main(["test", "--config", str(config), *FAST, "--ckpt_path", name,
                     "--trainer.default_root_dir", str(run)]) == 0
        weights = json.loads((run / "provenance_test.json").read_text())["weights"]
        assert weights["from"] == "checkpoint" and weights["path"] == str(expected)
        assert json.loads((run / "miate" / "test_seen.json").read_text())["weights"] == weights


def test_last_finds_checkpoints_outside_run_checkpoints(tmp_path, tiny_root):
    """Lightning's default ModelCheckpoint writes to RUN/logs/version_0/checkpoints: `last` finds them there."""
    config = _config(tmp_path, tiny_root, checkpoint=False)
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), *FAST, "--trainer.max_epochs", "1",
                 "--trainer.default_root_dir", str(run)]) == 0
    saved = next((run / "logs").rglob("*.ckpt"))
    assert main(["test", "--config", str(config), *FAST, "--ckpt_path", "last",
                 "--trainer.default_root_dir", str(run)]) == 0
    assert json.loads((run / "miate" / "test_seen.json").read_text())["checkpoint"] == str(saved)


def test_untrained_weights_never_reach_a_finished_run(tmp_path, tiny_root, capsys, recwarn):
    config = _config(tmp_path, tiny_root, checkpoint=False)
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), *FAST, "--trainer.max_epochs", "1",
                 "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(run)]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    for extra, said in ((["--ckpt_path", "last"], "--ckpt_path last: no checkpoint is recorded under"),
                        (["--ckpt_path", "best"], "--ckpt_path best: no best checkpoint"),
                        ([], "without --ckpt_path evaluates the model's untrained initial weights")):
        assert main(["test", "--config", str(config), *FAST, *extra, "--trainer.default_root_dir", str(run)]) == 2
        assert said in capsys.readouterr().err
    assert _snapshot(run) == before
    # in a folder of its own, untrained weights may be evaluated, and the files say so
    fresh = tmp_path / "untrained"
    assert main(["test", "--config", str(config), *FAST, "--trainer.default_root_dir", str(fresh)]) == 0
    weights = json.loads((fresh / "miate" / "test_seen.json").read_text())["weights"]
    assert weights["from"] == "initial" and "untrained" in weights["description"]
    assert any("memefx test: evaluating the model's initial weights: untrained" in str(w.message) for w in recwarn)


def test_test_after_fit_without_a_best_checkpoint_says_which_weights(tmp_path, tiny_root, recwarn):
    config = _config(tmp_path, tiny_root)
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), *FAST, "--trainer.max_epochs", "1", "--trainer.limit_val_batches",
                 "0", "--test_after_fit", "true", "--trainer.default_root_dir", str(run)]) == 0
    said = "\n".join(str(w.message) for w in recwarn)
    assert "the fit saved no best checkpoint" in said
    assert "memefx test: evaluating the weights at the end of the fit (epoch 0, step 2)" in said
    for path in (run / "miate" / "test_seen.json", run / "provenance_test.json"):
        weights = json.loads(path.read_text())["weights"]
        assert weights["from"] == "end of fit" and weights["epoch"] == 0, path


# ------------------------------------------------------------------------ 7. resume, changed settings
def test_resume_with_a_changed_batch_size_is_refused(copy, capsys):
    config, run = copy
    before = _snapshot(run)
    code = main(["fit", "--config", str(config), *FAST, "--trainer.max_epochs", "3", "--ckpt_path", "last",
                 "--data.batch_size", "16", "--trainer.default_root_dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "changes settings that decide the sample order or the model (data.batch_size: 32 -> 16)" in err
    assert _snapshot(run) == before


def test_resume_differences_names_what_changes_training_only():
    ckpt = {"hyper_parameters": {"lr": 1e-3, "miate_bootstrap": 50,
                                 "backbone_args": {"hidden_size": 32, "checkpoint": "/cluster/a.pth"}},
            "datamodule_hyper_parameters": {"root": "/cluster/data", "batch_size": 32, "num_workers": 8,
                                            "synthetic": {"seed": 0}},
            "callbacks": {"RunDirectory": {"training": {"world_size": 4, "accumulate_grad_batches": 1}}}}
    same = resume_differences(ckpt, {"lr": 0.001, "miate_bootstrap": 1000,
                                     "backbone_args": {"hidden_size": "32", "checkpoint": "/laptop/a.pth"}},
                              {"root": "/laptop/data", "batch_size": 32, "num_workers": 0, "synthetic": {"seed": 0}},
                              {"world_size": 4, "accumulate_grad_batches": 1})
    assert same == []
    changed = resume_differences(ckpt, {"lr": 1e-4, "backbone_args": {"hidden_size": 64}},
                                 {"batch_size": 32, "synthetic": {"seed": 1}},
                                 {"world_size": 2, "accumulate_grad_batches": 1})
    assert changed == ["model.backbone_args.hidden_size: 32 -> 64", "model.lr: 0.001 -> 0.0001",
                       "data.synthetic.seed: 0 -> 1", "trainer.world_size: 4 -> 2"]


# ------------------------------------------------------------------- 12. post-fit validation, loggers
def test_post_fit_validation_is_not_logged_as_one_more_epoch(finished):
    _, run = finished
    rows = pd.read_csv(run / "logs" / "version_0" / "metrics.csv")
    assert rows.epoch.max() == 1  # epochs 0 and 1 trained; nothing is logged under epoch 2
    assert sorted(rows.dropna(subset=["val/auroc"]).epoch.tolist()) == [0, 1]
    after = rows.dropna(subset=["val_ckpt/auroc"])  # the best checkpoint re-validated: its own keys, no epoch
    assert len(after) == 1 and after.epoch.isna().all() and after.step.tolist() == [rows.step.max()]
    tested = rows.dropna(subset=["test/auroc"])
    assert len(tested) == 1 and tested.epoch.isna().all()
    # metrics.json and the printed summary keep the val/* names (the best checkpoint's values)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/auroc"] == pytest.approx(float(after["val_ckpt/auroc"].iloc[0]))
    assert not any(k.startswith("val_ckpt/") or k == "step" for k in metrics)


# ------------------------------------------------------------------------- 14. splits before training
def _unlabeled_val_root(tmp_path: Path, tiny_root: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    rows = [json.loads(line) for line in (root / "dev_seen.jsonl").read_text().splitlines()]
    (root / "val_unlabeled.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "label"} | {"id": "9" + str(r["id"]).zfill(5)[1:]}) + "\n"
        for r in rows))
    (root / "dev_one_class.jsonl").write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows))
    return root


def test_unlabeled_validation_split_with_a_monitored_checkpoint_is_refused_before_training(tmp_path, tiny_root,
                                                                                            capsys):
    root = _unlabeled_val_root(tmp_path, tiny_root)
    config = _config(tmp_path, root)
    run = tmp_path / "run"
    for split, said in (("val_unlabeled", "the validation split 'val_unlabeled' has no labels"),
                        ("dev_one_class", "the validation split 'dev_one_class' has one class only (0 hateful")):
        code = main(["fit", "--config", str(config), *FAST, "--data.val_split", split,
                     "--trainer.default_root_dir", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and "ModelCheckpoint monitors 'val/auroc'" in err and said in err, err
        assert not run.exists() or _snapshot(run) == {}  # no file (the logger's empty folder at most) blocks a fit


@pytest.mark.parametrize(("splits", "said"), [
    ("[dev_seen, no_such_split]", "data.test_split 'no_such_split': {root}/no_such_split.jsonl not found"),
    ("[dev_seen, dev_seen]", "data.test_split lists a split twice"),
    ("[]", "data.test_split must be a split name or a non-empty list"),
])
def test_bad_test_splits_are_refused_before_training(tmp_path, tiny_root, capsys, splits, said):
    run = tmp_path / "run"
    code = main(["fit", "--config", str(_config(tmp_path, tiny_root)), *FAST, "--test_after_fit", "true",
                 "--data.test_split", splits, "--trainer.default_root_dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and said.format(root=tiny_root) in err, err
    assert not run.exists()  # refused before the trainer ran
