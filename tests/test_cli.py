"""The CLI in-process: fast_dev_run, a tiny real fit and its run directory, every YAML parses."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from memefx.cli import main
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "icl")


def _tiny_config(tmp_path, root, midas: bool = False) -> Path:
    """tests/conf/tiny.yaml (+ conf/midas.yaml) for the data folder ``root``."""
    return tiny_config(tmp_path, root, midas)


def test_fit_fast_dev_run(tmp_path, tiny_root):
    run = tmp_path / "run"
    main(["fit", "--config", str(_tiny_config(tmp_path, tiny_root)), "--trainer.fast_dev_run", "true",
          "--trainer.default_root_dir", str(run)])
    assert (run / "predictions" / "dev_seen.parquet").is_file()
    assert not (run / "config.yaml").exists()  # Lightning saves no config under fast_dev_run


@pytest.mark.slow  # a 1-epoch fit, a test and a report: about 55 s on a loaded 2-core machine
def test_fit_writes_run_directory(tmp_path, tiny_root, capsys):
    run = tmp_path / "run"
    main(["fit", "--config", str(_tiny_config(tmp_path, tiny_root, midas=True)), "--trainer.max_epochs", "1",
          "--trainer.default_root_dir", str(run), "--test_after_fit", "true"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["root"] == str(tiny_root) and saved["trainer"]["default_root_dir"] == str(run)
    for split in ("dev_seen", "test_seen"):
        pred = pd.read_parquet(run / "predictions" / f"{split}.parquet")
        truth = pd.read_json(tiny_root / f"{split}.jsonl", lines=True, dtype={"id": str})
        assert list(pred.columns) == ["id", "label", "p_hateful"]
        assert sorted(pred.id) == sorted(truth.id)  # every meme once
        assert pred.p_hateful.between(0, 1).all()
        miate = json.loads((run / "miate" / f"{split}.json").read_text())
        assert miate["split"] == split and miate["shared_image"]["n_strata"] > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/auroc", "test/auroc", "val/miate_shared_text"} <= set(metrics)
    assert "val/auroc=" in capsys.readouterr().out
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert main(["report", str(run)]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "| dev_seen | shared_image |" in report
    # the fit's epoch, then the best checkpoint (epoch 0) re-validated: never a phantom epoch 1
    assert {p.name for p in (run / "midas").iterdir()} == {
        "train_epoch0.parquet", "val_epoch0.parquet", "val_ckpt_epoch0.parquet"}
    assert pd.read_parquet(run / "midas" / "val_ckpt_epoch0.parquet").epoch.unique().tolist() == [0]
    assert json.loads((run / "miate" / "test_seen.json").read_text())["epoch"] == 0
    assert "## MIDAS" in report and "Predicting miATE_g >= 0.5" in report  # AUC, or why there is none
    for png in ("val_miate.png", "val_auroc.png", "dev_seen_threshold_curve.png", "midas_attattr_curves.png",
                "val_ckpt_epoch0_cross_heatmap.png"):
        assert (run / "report" / png).stat().st_size > 1000


@pytest.mark.slow  # about 30 s
def test_wandb_logger_offline(tmp_path, tiny_root, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    main(["fit", "--config", str(_tiny_config(tmp_path, tiny_root)), "--config", str(ROOT / "configs/logger/wandb.yaml"),
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(run)])
    assert list((run / "wandb").glob("offline-run-*"))  # fast_dev_run would swap loggers for a dummy


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "trainer:" in capsys.readouterr().out


def test_synth_command(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--seed", "1", "--n-memes", "80", "--image-size", "16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(s["memes"] for s in summary["splits"].values()) == 80
    assert (tmp_path / "s" / "train.jsonl").is_file()


def test_synth_options_come_from_synthetic_config(tmp_path, capsys):
    """Flags (dashes or underscores) and a YAML config share SyntheticConfig's schema."""
    import dataclasses

    from memefx.data.synthetic import SyntheticConfig

    (tmp_path / "synth.yaml").write_text("n_memes: 70\nimage_size: 16\nlabel_noise: 0.1\n")
    assert main(["synth", "--out", str(tmp_path / "a"), "--config", str(tmp_path / "synth.yaml")]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), "--n-memes", "70", "--image_size", "16",
                 "--label-noise", "0.1"]) == 0
    a = json.loads((tmp_path / "a" / "synthetic.json").read_text())
    assert a == json.loads((tmp_path / "b" / "synthetic.json").read_text())
    assert a["n_memes"] == 70 and a["label_noise"] == 0.1
    assert main(["synth", "--out", str(tmp_path / "c"), "--n-memes", "0"]) == 2  # the dataclass's own check
    with pytest.raises(SystemExit):  # every dataclass field is an option, and only those
        main(["synth", "--out", str(tmp_path / "d"), "--no-such-option", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    shown = capsys.readouterr().out
    assert all(f"--{field.name}" in shown for field in dataclasses.fields(SyntheticConfig))


def test_help_lists_every_command(capsys):
    from memefx.cli import TOOLS

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", *TOOLS):
        assert f"\n  {command} " in text, command
    assert main([]) == 2  # no command: the overview, and a usage error


@pytest.mark.slow  # a fresh interpreter
def test_commands_other_than_training_start_without_torch():
    """``memefx --help``, synth, strata, study, miate and report do not import torch, Lightning or
    transformers before they need them (a fit does)."""
    import subprocess
    import sys

    code = ("import sys; from memefx.cli import main; import memefx.report.miate_cli, memefx.report.study; "
            "print([m for m in ('torch', 'lightning', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_broken_config_file_is_named_before_any_usage_text(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: 1\n   devices: 1\n")
    assert main(["fit", "--config", "configs/experiment/synthetic_visualbert.yaml", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3:" in err and "not valid YAML" in err and "usage" not in err
    assert main(["synth", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "s")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["strata", "report", "regions", "miate", "study"])
def test_every_tool_help_comes_from_its_typed_signature(command, capsys):
    """Each option in ``--help`` is a parameter of the command's typed function, with its docstring line."""
    import inspect

    from memefx import cli
    from memefx.report.miate_cli import miate_command

    func = {"strata": cli.strata, "report": cli.report, "regions": cli.regions, "miate": miate_command,
            "study": cli.study}[command]
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name, param in inspect.signature(func).parameters.items():
        if name == "fit_args":
            continue
        assert name in text, (command, name)
        assert param.annotation is not inspect.Parameter.empty, (command, name)
    assert "type:" in text or command == "report"


def test_switches_and_dashes_as_users_type_them(tmp_path, capsys):
    from tests.test_miate_cli import SCORES, TABLE

    table = tmp_path / "confounders.parquet"
    pd.DataFrame(TABLE, columns=["id", "split", "label", "img_org_id", "txt_org_id"]).to_parquet(table)
    scores = tmp_path / "s.csv"
    pd.DataFrame({"id": list(SCORES), "p_hateful": list(SCORES.values())}).to_csv(scores, index=False)
    assert main(["miate", "--predictions", str(scores), "--confounders", str(table), "--pairs-only", "--json",
                 "--n-bootstrap", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shared_image"]["options"]["pairs_only"] is True and result["shared_image"]["n_strata"] == 1
    assert main(["strata", "--confounders", str(table), "--json"]) == 0
    assert "dev_seen" in json.loads(capsys.readouterr().out)
