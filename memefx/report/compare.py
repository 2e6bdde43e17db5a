"""``memefx report --compare RUN_A RUN_B``: what differs between two runs, and whether results match.

Config and provenance differences are listed (information); metrics, predictions, miATE and MIDAS tables
are compared with a tolerance and decide the exit status (non-zero when any result differs beyond it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml

IGNORED = ("trainer.default_root_dir", "created", "argv", "data.root")


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _diff(a: dict, b: dict, skip: tuple[str, ...] = IGNORED) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    lines = []
    for key in sorted(set(fa) | set(fb)):
        if any(key == s or key.endswith("." + s) or key.startswith(s + ".") for s in skip):
            continue
        if fa.get(key, "<absent>") != fb.get(key, "<absent>"):
            lines.append(f"{key}: {fa.get(key, '<absent>')!r} -> {fb.get(key, '<absent>')!r}")
    return lines


def _load(path: Path, kind: str) -> dict:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) if kind == "yaml" else json.loads(path.read_text())


def _numbers_differ(x, y, atol: float) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return False
    return x is None or y is None or abs(float(x) - float(y)) > atol


def compare_runs(run_a: str | Path, run_b: str | Path, atol: float = 1e-6) -> tuple[list[str], list[str]]:
    """Return (informational differences, result differences beyond ``atol``)."""
    a, b = Path(run_a), Path(run_b)
    info = [f"config {d}" for d in _diff(_load(a / "config.yaml", "yaml"), _load(b / "config.yaml", "yaml"))]
    pa, pb = _load(a / "provenance.json", "json"), _load(b / "provenance.json", "json")
    info += [f"provenance {d}" for d in _diff({k: v for k, v in pa.items() if k != "config"},
                                               {k: v for k, v in pb.items() if k != "config"})]
    results = []
    ma, mb = _load(a / "metrics.json", "json"), _load(b / "metrics.json", "json")
    for key in sorted(set(ma) | set(mb)):
        if _numbers_differ(ma.get(key), mb.get(key), atol):
            results.append(f"metric {key}: {ma.get(key)} -> {mb.get(key)}")
    for rel in sorted({p.relative_to(a) for p in a.glob("predictions/*.parquet")} |
                      {p.relative_to(b) for p in b.glob("predictions/*.parquet")}):
        if not (a / rel).is_file() or not (b / rel).is_file():
            results.append(f"{rel}: only in {'A' if (a / rel).is_file() else 'B'}")
            continue
        x, y = pd.read_parquet(a / rel), pd.read_parquet(b / rel)
        merged = x.merge(y, on="id", how="outer", suffixes=("_a", "_b"), indicator=True)
        if (merged["_merge"] != "both").any():
            results.append(f"{rel}: {int((merged['_merge'] != 'both').sum())} ids in only one run")
        gap = (merged.p_hateful_a - merged.p_hateful_b).abs().max()
        if gap > atol:
            results.append(f"{rel}: max |p_hateful difference| {gap:.3g}")
    for rel in sorted({p.relative_to(a) for p in a.glob("miate/*.json")}):
        x, y = _load(a / rel, "json"), _load(b / rel, "json")
        for kind in ("shared_image", "shared_text"):
            for key in ("mean", "ci_low", "ci_high", "n_strata"):
                va, vb = (x.get(kind) or {}).get(key), (y.get(kind) or {}).get(key)
                if _numbers_differ(va, vb, atol):
                    results.append(f"{rel} {kind}.{key}: {va} -> {vb}")
    for rel in sorted({p.relative_to(a) for p in a.glob("midas/*.parquet")}):
        if not (b / rel).is_file():
            results.append(f"{rel}: only in A")
            continue
        keys = ["id", "layer", "head", "block", "score"]
        x = pd.read_parquet(a / rel).sort_values(keys, ignore_index=True)
        y = pd.read_parquet(b / rel).sort_values(keys, ignore_index=True)
        if len(x) != len(y) or not x[keys].equals(y[keys]):
            results.append(f"{rel}: different rows")
        elif (gap := (x["sum"] - y["sum"]).abs().max()) > atol:
            results.append(f"{rel}: max |sum difference| {gap:.3g}")
    return info, results
