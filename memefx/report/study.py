"""A study over training seeds: one run directory per seed, and a summary whose intervals include the
seed-to-seed variation, not only the strata's.

A single run's miATE interval (a bootstrap over strata) says how sure the estimate is for *that* trained
model; a claim about the method ("the image side carries more causal weight than the text side") must
also survive retraining. The summary therefore resamples at two levels, as a hierarchical bootstrap:
seeds with replacement, then the strata within each drawn seed; each replicate's estimate is the mean of
the drawn seeds' stratum means. The image-minus-text difference is formed inside each replicate (the same
seeds for both kinds, their strata drawn independently), so its interval carries both sources of
variation too. Reads run directories only (``metrics.json``, ``miate/<split>.json``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from memefx.errors import UserError, read_json
from memefx.jsonio import dumps
from memefx.run_files import CONFIG, METRICS, REPORT, miate_file
from memefx.schema import KINDS
from memefx.stats import percentile_interval

SEED_DIR = re.compile(r"^seed(\d+)$")
STUDY_FILE = "study.json"


def seed_runs(study_dir: str | Path) -> dict[int, Path]:
    """The finished sibling runs of a study folder: ``seed<k>/`` holding ``metrics.json``."""
    study_dir = Path(study_dir)
    runs = {}
    for path in sorted(study_dir.iterdir()) if study_dir.is_dir() else []:
        match = SEED_DIR.match(path.name)
        if match and path.is_dir() and (path / METRICS).is_file():
            runs[int(match.group(1))] = path
    return dict(sorted(runs.items()))


def _test_splits(run: Path) -> list[str]:
    """The test splits of a run, from its saved config (``data.test_split``: one name or a list)."""
    import yaml

    path = run / CONFIG
    given = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("test_split") if path.is_file() else None
    return [given] if isinstance(given, str) else list(given or [])


def _metric(metrics: dict, split: str, name: str, test_splits: list[str]) -> float | None:
    """A split's metric as the run logged it: ``test/<split>/<name>`` when several splits were tested,
    ``test/<name>`` for the only one."""
    keys = [f"test/{split}/{name}"] + ([f"test/{name}"] if test_splits == [split] else [])
    for key in keys:
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def per_seed_table(runs: dict[int, Path]) -> pd.DataFrame:
    """One row per (seed, tested split): AUROC, accuracy and the miATE mean of each kind, as each run
    reported them (the test stage of the fit: the checkpoint chosen on the validation split)."""
    rows = []
    for seed, run in runs.items():
        metrics = read_json(run / METRICS)
        tested = _test_splits(run)
        for split in tested:
            row = {"seed": seed, "split": split, "auroc": _metric(metrics, split, "auroc", tested),
                   "acc": _metric(metrics, split, "acc", tested)}
            path = miate_file(run, split)
            miate = read_json(path) if path.is_file() else {}
            for kind in KINDS:
                row[f"miate_{kind}"] = (miate.get(kind) or {}).get("mean")
            rows.append(row)
    return pd.DataFrame(rows)


def _stratum_values(run: Path, split: str, kind: str) -> np.ndarray:
    path = miate_file(run, split)
    if not path.is_file():
        return np.array([])
    strata = (read_json(path).get(kind) or {}).get("strata") or []
    return np.array([s["miate"] for s in strata if s.get("miate") is not None], dtype=float)


def hierarchical_bootstrap(values: list[np.ndarray], other: list[np.ndarray] | None = None,
                           n_bootstrap: int = 2000, seed: int = 0) -> np.ndarray:
    """Replicates of the mean over seeds of per-seed stratum means (minus the same for ``other``, paired by
    seed): seeds drawn with replacement, then strata within each drawn seed. Seeds without strata are left out."""
    keep = [k for k, v in enumerate(values) if len(v) and (other is None or len(other[k]))]
    if not keep:
        return np.array([])
    rng = np.random.default_rng(seed)
    out = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        drawn = rng.choice(keep, size=len(keep), replace=True)
        est = [values[k][rng.integers(0, len(values[k]), len(values[k]))].mean() for k in drawn]
        if other is not None:
            est = [e - other[k][rng.integers(0, len(other[k]), len(other[k]))].mean() for e, k in zip(est, drawn)]
        out[b] = np.mean(est)
    return out


def _interval(point: float | None, replicates: np.ndarray) -> dict:
    if point is None or not len(replicates):
        return {"mean": point, "ci_low": None, "ci_high": None}
    low, high = percentile_interval(replicates)
    return {"mean": point, "ci_low": low, "ci_high": high}


def _mean_std(values: pd.Series) -> dict:
    values = values.dropna()
    return {"mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) > 1 else None, "n": int(len(values)),
            "per_seed": [float(v) for v in values]}


def summarize_study(study_dir: str | Path, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """The study's summary: per split AUROC/accuracy mean and standard deviation over seeds; miATE per kind as
    the mean over seeds of each run's stratum mean, with a hierarchical-bootstrap 95% interval; and the
    image-minus-text difference with its interval. Written to ``<study_dir>/study.json`` and ``study.csv``."""
    study_dir = Path(study_dir)
    runs = seed_runs(study_dir)
    if not runs:
        raise UserError(f"{study_dir}: no finished seed runs (seed<k>/ folders holding metrics.json); run "
                        "memefx study --config ... --seeds ... first")
    table = per_seed_table(runs)
    splits: dict[str, dict] = {}
    for split, rows in table.groupby("split", sort=True):
        rows = rows.set_index("seed")
        entry = {"auroc": _mean_std(rows.auroc), "acc": _mean_std(rows.acc), "miate": {}}
        strata = {kind: [_stratum_values(runs[s], split, kind) for s in rows.index] for kind in KINDS}
        for k, kind in enumerate(KINDS):
            seeds_mean = [v.mean() for v in strata[kind] if len(v)]
            point = float(np.mean(seeds_mean)) if seeds_mean else None
            entry["miate"][kind] = {**_interval(point, hierarchical_bootstrap(strata[kind], None, n_bootstrap, seed + k)),
                                    "per_seed": [float(v.mean()) if len(v) else None for v in strata[kind]]}
        image, text = strata["shared_image"], strata["shared_text"]
        paired = [i.mean() - t.mean() for i, t in zip(image, text) if len(i) and len(t)]
        entry["image_minus_text"] = _interval(float(np.mean(paired)) if paired else None,
                                              hierarchical_bootstrap(image, text, n_bootstrap, seed + 7))
        splits[str(split)] = entry
    summary = {"seeds": list(runs), "runs": {str(s): str(p) for s, p in runs.items()}, "splits": splits,
               "interval": "hierarchical bootstrap: seeds with replacement, then strata within each seed; "
                           f"{n_bootstrap} replicates, 95% percentile interval",
               "n_bootstrap": n_bootstrap, "bootstrap_seed": seed}
    (study_dir / STUDY_FILE).write_text(dumps(summary, indent=2))
    table.to_csv(study_dir / "study.csv", index=False)
    return summary


def study_lines(summary: dict) -> list[str]:
    """The summary as readable lines (what ``memefx study`` prints)."""
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = [f"seeds {summary['seeds']}"]
    for split, entry in summary["splits"].items():
        a = entry["auroc"]
        parts = [f"{split}: AUROC {fmt(a['mean'])} ± {fmt(a['std'])} (sd over {a['n']} seeds)"]
        for kind in KINDS:
            m = entry["miate"][kind]
            parts.append(f"miATE {kind} {fmt(m['mean'])} [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]")
        d = entry["image_minus_text"]
        parts.append(f"image - text {fmt(d['mean'])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]")
        lines.append("; ".join(parts))
    return lines


def is_study_directory(path: str | Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


def write_study_report(study_dir: str | Path) -> Path:
    """``memefx report STUDY_DIR``: ``report/study.md`` and a plot of AUROC and miATE per seed and split,
    with the across-seed intervals; the summary is recomputed from the seed runs first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study_dir = Path(study_dir)
    summary = summarize_study(study_dir, n_bootstrap=read_json(study_dir / STUDY_FILE).get("n_bootstrap", 2000))
    out = study_dir / REPORT
    out.mkdir(parents=True, exist_ok=True)
    labeled = {s: e for s, e in summary["splits"].items() if e["auroc"]["n"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, entry in enumerate(labeled.values()):
        left.scatter([k] * entry["auroc"]["n"], entry["auroc"]["per_seed"], color="C0", alpha=0.6)
        left.errorbar(k, entry["auroc"]["mean"], yerr=entry["auroc"]["std"] or 0, color="k", marker="_", capsize=6)
        for j, kind in enumerate(KINDS):
            m = entry["miate"][kind]
            if m["mean"] is None:
                continue
            x = k + (j - 0.5) * 0.3
            right.errorbar(x, m["mean"], yerr=[[m["mean"] - m["ci_low"]], [m["ci_high"] - m["mean"]]], color=f"C{j}",
                           marker="o", capsize=4, label=kind if k == 0 else None)
            right.scatter([x] * len(m["per_seed"]), [v for v in m["per_seed"] if v is not None], color=f"C{j}",
                          alpha=0.3, s=12)
    for ax in (left, right):
        ax.set_xticks(range(len(labeled)), list(labeled))
    left.set(ylabel="AUROC (dots: seeds; bar: mean ± sd)", title=f"AUROC over {len(summary['seeds'])} seeds")
    right.axhline(0, color="grey", lw=0.8)
    right.set(ylabel="miATE (mean over seeds, 95% CI)", title="miATE per kind (seed and stratum resampling)")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    plt.close(fig)
    path = out / "study.md"
    path.write_text("\n".join([f"# memefx study: {study_dir}", "", *[f"- {line}" for line in study_lines(summary)],
                               "", f"_{summary['interval']}_", "", "![study](study.png)"]) + "\n")
    return path
