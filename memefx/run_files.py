"""The names of a run directory's files, in one place: ``RunDirectory`` writes them, ``memefx report``,
``report --compare``, ``memefx study`` and the CLI read them (a leaf module: no memefx imports)."""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"  # the fit's resolved config (config_<stage>.yaml for later stages)
PROVENANCE = "provenance.json"  # provenance_<stage>.json for later stages
METRICS = "metrics.json"  # metrics_<stage>.json for later stages
PREDICTIONS = "predictions"  # <split>.parquet: id, label, p_hateful
MIATE = "miate"  # <split>.json
MIDAS = "midas"  # <stage>_epoch<k>.parquet, <stage>_ckpt_epoch<k>.parquet
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"  # beside the checkpoints it records
REPORT = "report"
LOCK = ".memefx.lock"
ARTIFACTS = (CONFIG, PROVENANCE, METRICS, PREDICTIONS, MIATE, MIDAS, CHECKPOINTS, REPORT)


def staged(name: str, stage: str | None) -> str:
    """``metrics.json`` of a fit, ``metrics_test.json`` of a later ``memefx test`` (same for config, provenance)."""
    if stage in (None, "fit"):
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}_{stage}{dot}{suffix}"


def predictions_file(run: str | Path, split: str) -> Path:
    return Path(run) / PREDICTIONS / f"{split}.parquet"


def miate_file(run: str | Path, split: str) -> Path:
    return Path(run) / MIATE / f"{split}.json"
