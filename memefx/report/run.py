"""``memefx report RUN_DIR``: PNG plots and a markdown table from a run directory (pandas + matplotlib).

Reads only files other tools can read too: the CSV logger's ``metrics.csv``, ``miate/<split>.json`` and
``metrics.json``. Writes ``report/*.png`` and ``report/report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

KINDS = ("shared_image", "shared_text")


def epoch_metrics(run_dir: Path) -> pd.DataFrame:
    """Per-epoch evaluation metrics from the newest CSV-logger ``metrics.csv`` under the run directory."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no metrics.csv (was the run logged with the CSV logger?)")
    frame = pd.read_csv(files[-1])
    cols = [c for c in frame.columns if c.startswith(("val/", "test/"))]
    return frame[["epoch", *cols]].dropna(how="all", subset=cols).groupby("epoch").last().reset_index()


def plot_miate_curves(frame: pd.DataFrame, out: Path, stage: str = "val") -> Path | None:
    """miATE per kind over epochs, with the bootstrap interval as a band."""
    if not any(f"{stage}/miate_{k}" in frame for k in KINDS):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in KINDS:
        col = f"{stage}/miate_{kind}"
        if col not in frame:
            continue
        rows = frame.dropna(subset=[col])
        ax.plot(rows.epoch, rows[col], marker="o", label=kind)
        if f"{col}_lo" in rows:
            ax.fill_between(rows.epoch, rows[f"{col}_lo"], rows[f"{col}_hi"], alpha=0.2)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="miATE (mean over strata, 95% CI)", title=f"{stage} miATE per stratum kind")
    ax.legend()
    return _save(fig, out / f"{stage}_miate.png")


def plot_auroc(frame: pd.DataFrame, out: Path) -> Path | None:
    """Validation AUROC and accuracy over epochs."""
    cols = [c for c in ("val/auroc", "val/acc") if c in frame]
    if not cols:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for col in cols:
        rows = frame.dropna(subset=[col])
        ax.plot(rows.epoch, rows[col], marker="o", label=col)
    ax.set(xlabel="epoch", ylabel="score", ylim=(0, 1.02), title="validation AUROC / accuracy")
    ax.legend()
    return _save(fig, out / "val_auroc.png")


def plot_threshold_curve(miate: dict, out: Path) -> Path | None:
    """Mean miATE of the strata kept by ``miate_g >= tau``: how much a cut on the outcome inflates it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in KINDS:
        curve = [c for c in miate.get(kind, {}).get("threshold_curve", []) if c["mean"] is not None]
        if curve:
            ax.plot([c["tau"] for c in curve], [c["mean"] for c in curve], marker=".", label=kind)
            ax.axhline(miate[kind]["mean"], ls="--", lw=0.8, color=ax.lines[-1].get_color())
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set(xlabel="threshold tau", ylabel="mean miATE of kept strata",
           title=f"{miate['split']}: selection on the outcome (dashed: no cut)")
    ax.legend()
    return _save(fig, out / f"{miate['split']}_threshold_curve.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def miate_table(miates: list[dict]) -> str:
    """Markdown rows: split, kind, strata, mean with CI, SE, weighted mean, placebo."""
    lines = ["| split | kind | strata | miATE [95% CI] | SE | member-weighted | placebo (sd) |",
             "|---|---|---:|---|---:|---:|---|"]
    for m in miates:
        for kind in KINDS:
            r = m.get(kind)
            if not r or not r.get("n_strata"):
                continue
            placebo = r.get("placebo") or {}
            lines.append(
                f"| {m['split']} | {kind} | {r['n_strata']} | {_fmt(r['mean'])} [{_fmt(r['ci_low'])}, "
                f"{_fmt(r['ci_high'])}] | {_fmt(r['se'])} | {_fmt(r['weighted_mean'])} | "
                f"{_fmt(placebo.get('mean'))} ({_fmt(placebo.get('sd'))}) |"
            )
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report/report.md`` and its PNG plots; return the markdown path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    miates = [json.loads(p.read_text()) for p in sorted((run_dir / "miate").glob("*.json"))]
    plots = []
    try:
        frame = epoch_metrics(run_dir)
        plots += [plot_miate_curves(frame, out), plot_auroc(frame, out)]
    except FileNotFoundError as err:
        plots.append(None)
        note = str(err)
    else:
        note = ""
    plots += [plot_threshold_curve(m, out) for m in miates]
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    md = [f"# memefx report: {run_dir}", ""]
    if metrics:
        md += ["| metric | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())] + [""]
    md += ["## miATE", "", miate_table(miates), ""]
    if note:
        md += [f"_{note}_", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
