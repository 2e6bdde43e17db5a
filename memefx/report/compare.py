"""``memefx report --compare RUN_A RUN_B``: what differs between two runs, and whether results match.

Config and provenance differences are listed (information); metrics (``metrics.json`` and the
``metrics_<stage>.json`` of later validate/test runs), predictions, miATE and MIDAS tables are compared
with a tolerance and decide the exit status (non-zero when any result differs beyond it).

Two numbers match when |a - b| <= atol + rtol * scale, numpy's ``isclose`` rule: the scale of a metric,
probability or miATE figure is its own magnitude; of a MIDAS table, the largest |sum| of its score (block
sums of a long sequence are large, and a rerun with another thread count moves them by float rounding
in proportion). Bit-identical runs need the same machine type, library versions and thread count.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from memefx.errors import read_json
from memefx.run_files import CONFIG, METRICS, PROVENANCE
from memefx.schema import KINDS

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
    return yaml.safe_load(path.read_text()) if kind == "yaml" else read_json(path)


def _relative_to_run(obj, run: Path):
    """The run's own folder written as ``<RUN>`` (logger and checkpoint paths differ by it alone)."""
    if isinstance(obj, dict):
        return {k: _relative_to_run(v, run) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_to_run(v, run) for v in obj]
    if isinstance(obj, str):
        for form in {str(run), str(run.resolve())}:
            obj = obj.replace(form, "<RUN>")
    return obj


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _numbers_differ(x, y, atol: float, rtol: float = 0.0) -> bool:
    """Missing (absent, None or NaN) on both sides is equal; on one side only, a difference."""
    if _missing(x) or _missing(y):
        return _missing(x) != _missing(y)
    return abs(float(x) - float(y)) > atol + rtol * max(abs(float(x)), abs(float(y)))


def _files(a: Path, b: Path, pattern: str) -> list[Path]:
    """Relative paths matching ``pattern`` in either run (a file only in B is seen too)."""
    return sorted({p.relative_to(a) for p in a.glob(pattern)} | {p.relative_to(b) for p in b.glob(pattern)})


def _only_in_one(a: Path, b: Path, rel: Path) -> str | None:
    if (a / rel).is_file() and (b / rel).is_file():
        return None
    return f"{rel}: only in {'A' if (a / rel).is_file() else 'B'}"


def compare_runs(run_a: str | Path, run_b: str | Path, atol: float = 1e-6,
                 rtol: float = 1e-5) -> tuple[list[str], list[str]]:
    """Return (informational differences, result differences beyond ``atol + rtol * scale``)."""
    a, b = Path(run_a), Path(run_b)
    config_a = _relative_to_run(_load(a / CONFIG, "yaml"), a)
    config_b = _relative_to_run(_load(b / CONFIG, "yaml"), b)
    info = [f"config {d}" for d in _diff(config_a, config_b)]
    pa, pb = _load(a / PROVENANCE, "json"), _load(b / PROVENANCE, "json")
    info += [f"provenance {d}" for d in _diff({k: v for k, v in pa.items() if k != "config"},
                                               {k: v for k, v in pb.items() if k != "config"})]
    results = []
    for rel in _files(a, b, "metrics*.json"):  # the fit's metrics.json and metrics_<stage>.json of later stages
        if line := _only_in_one(a, b, rel):
            results.append(line)
            continue
        ma, mb = _load(a / rel, "json"), _load(b / rel, "json")
        where = "" if rel.name == METRICS else f" ({rel.name})"
        for key in sorted(set(ma) | set(mb)):
            if _numbers_differ(ma.get(key), mb.get(key), atol, rtol):
                results.append(f"metric {key}{where}: {ma.get(key)} -> {mb.get(key)}")
    for rel in _files(a, b, "predictions/*.parquet"):
        if line := _only_in_one(a, b, rel):
            results.append(line)
            continue
        x, y = pd.read_parquet(a / rel), pd.read_parquet(b / rel)
        merged = x.merge(y, on="id", how="outer", suffixes=("_a", "_b"), indicator=True)
        if (merged["_merge"] != "both").any():
            results.append(f"{rel}: {int((merged['_merge'] != 'both').sum())} ids in only one run")
        gap = (merged.p_hateful_a - merged.p_hateful_b).abs()
        bound = atol + rtol * merged[["p_hateful_a", "p_hateful_b"]].abs().max(axis=1)
        if (gap > bound).any():
            gap = gap.max()
            results.append(f"{rel}: max |p_hateful difference| {gap:.3g}")
    for rel in _files(a, b, "miate/*.json"):
        if line := _only_in_one(a, b, rel):
            results.append(line)
            continue
        x, y = _load(a / rel, "json"), _load(b / rel, "json")
        for kind in KINDS:
            for key in ("mean", "ci_low", "ci_high", "n_strata", "weighted_mean"):
                va, vb = (x.get(kind) or {}).get(key), (y.get(kind) or {}).get(key)
                if _numbers_differ(va, vb, atol, rtol):
                    results.append(f"{rel} {kind}.{key}: {va} -> {vb}")
    for rel in _files(a, b, "midas/*.parquet"):
        if line := _only_in_one(a, b, rel):
            results.append(line)
            continue
        keys = ["id", "layer", "head", "block", "score"]
        x = pd.read_parquet(a / rel).sort_values(keys, ignore_index=True)
        y = pd.read_parquet(b / rel).sort_values(keys, ignore_index=True)
        if len(x) != len(y) or not x[keys].equals(y[keys]):
            results.append(f"{rel}: different rows")
        else:
            for score, rows in x.groupby("score"):
                other = y.loc[rows.index, "sum"]
                gap = float((rows["sum"] - other).abs().max())
                scale = float(max(rows["sum"].abs().max(), other.abs().max()))
                if gap > atol + rtol * scale:
                    results.append(f"{rel}: {score} max |sum difference| {gap:.3g} (largest |sum| {scale:.3g})")
    return info, results
