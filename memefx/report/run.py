"""``memefx report RUN_DIR``: PNG plots and a markdown table from a run directory (pandas + matplotlib).

Reads only files other tools can read too: the CSV logger's ``metrics.csv``, ``miate/<split>.json`` and
``metrics.json``. Writes ``report/*.png`` and ``report/report.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from memefx.errors import UserError, read_json  # noqa: E402
from memefx.jsonio import dumps  # noqa: E402
from memefx.run_files import CONFIG, METRICS, MIATE, MIDAS, PREDICTIONS, PROVENANCE, REPORT, staged  # noqa: E402
from memefx.schema import KINDS  # noqa: E402


def epoch_metrics(run_dir: Path) -> pd.DataFrame:
    """Per-epoch evaluation metrics of the fit, from the CSV logger's ``metrics.csv`` files.

    Only epochs that trained are kept. An evaluation outside the fit (the best checkpoint re-validated or
    tested, ``memefx validate|test``) is logged without an epoch and its validation under ``val_ckpt/*``; logs
    written before that change carry it under the epoch counter's final value, an epoch that never ran. Its
    numbers are in ``metrics.json`` (``metrics_<stage>.json``) and the miATE files, with the checkpoint's epoch.
    """
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no metrics.csv (was the run logged with the CSV logger?)")
    # a resumed run logs into a new logger version: later files win for the epochs they repeat
    frame = pd.concat([pd.read_csv(f).assign(_order=i) for i, f in enumerate(files)], ignore_index=True)
    if "epoch" not in frame:  # only evaluations outside a fit were logged: no epoch at all
        frame["epoch"] = float("nan")
    frame = frame.sort_values(["_order"], kind="stable").drop(columns="_order")
    trained = [c for c in frame.columns if c.startswith("train/")]
    if trained and frame[trained].notna().any().any():
        last = frame.loc[frame[trained].notna().any(axis=1), "epoch"].max()
        frame = frame[frame.epoch <= last]
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
    ax.set(xlabel="threshold tau (strata with miATE_g >= tau kept)", ylabel="mean miATE of the kept strata",
           title=f"{miate['split']}: mean miATE after keeping strata with miATE_g >= tau\n"
                 "(dashed: every stratum; a cut on the outcome inflates the mean)")
    ax.title.set_fontsize(9)
    ax.legend()
    return _save(fig, out / f"{miate['split']}_threshold_curve.png")


TABLE_NAME = re.compile(r"^(?P<stage>train|val|test)(?P<ckpt>_ckpt)?_epoch(?P<epoch>\d+|init)$")


def midas_tables(run_dir: Path) -> dict[tuple[str, int, bool], Path]:
    """(stage, epoch, from a checkpoint evaluated after the fit) -> path of every MIDAS table."""
    out = {}
    for path in (run_dir / MIDAS).glob("*.parquet"):
        match = TABLE_NAME.match(path.stem)
        if match is None:
            continue
        epoch = -1 if match["epoch"] == "init" else int(match["epoch"])
        out[(match["stage"], epoch, bool(match["ckpt"]))] = path
    return dict(sorted(out.items()))


SCORE_NAMES = {"attattr": "attention x gradient", "gradient": "gradient", "attention": "attention"}


def plot_midas_curves(tables: dict[tuple[str, int, bool], Path], out: Path, score: str = "attattr") -> Path | None:
    """Block means (sums of sums over sums of counts) per epoch, one panel per stage.

    Epochs of the fit are joined by lines; a checkpoint evaluated after the fit is a lone marker at the
    epoch that trained its weights.
    """
    from memefx.attribution.midas import block_summary

    if not tables:
        return None
    parts = []
    for (_, _, ckpt), path in tables.items():
        parts.append(block_summary(pd.read_parquet(path, filters=[("score", "==", score)])).assign(ckpt=ckpt))
    summary = pd.concat(parts)
    stages = [s for s in ("train", "val", "test") if s in set(summary.stage)]
    # one epoch axis for the curve panels: a lone checkpoint point sits where its epoch is on the curves
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.8), squeeze=False)
    curves = [ax for ax, stage in zip(axes[0], stages) if summary[summary.stage == stage].epoch.nunique() > 1]
    for ax in curves[1:]:
        ax.sharex(curves[0])
    for ax, stage in zip(axes[0], stages):
        rows = summary[summary.stage == stage]
        if rows.epoch.nunique() == 1:  # one evaluation (a checkpoint tested once): its block means as bars
            _midas_bars(ax, rows, stage, score)
            continue
        for i, (block, part) in enumerate(rows.groupby("block")):
            color = f"C{i}"
            fit = part[~part.ckpt]
            if len(fit):
                ax.plot(fit.epoch, fit["mean"], marker="o", color=color, label=block)
            ckpt = part[part.ckpt]
            if len(ckpt):
                ax.scatter(ckpt.epoch, ckpt["mean"], marker="*", s=120, color=color,
                           label=f"{block} (checkpoint)" if fit.empty else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"{stage}: MIDAS {score} block mean", xlabel="epoch (star: checkpoint after the fit)",
               ylabel=f"block mean of {SCORE_NAMES.get(score, score)}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    return _save(fig, out / f"midas_{score}_curves.png")


def _midas_bars(ax, rows: pd.DataFrame, stage: str, score: str) -> None:
    """A stage evaluated once: one bar per block, its value written on it (a lone point on an epoch axis
    reads as an empty plot)."""
    rows = rows.sort_values("block")
    epoch = int(rows.epoch.iloc[0])
    ax.bar(rows.block, rows["mean"], color=[f"C{i}" for i in range(len(rows))])
    for x, value in enumerate(rows["mean"]):
        ax.annotate(f"{value:.2e}", (x, value), ha="center", va="bottom" if value >= 0 else "top", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    weights = "the weights the model was built with" if epoch < 0 else f"weights of epoch {epoch}"
    ax.set(title=f"{stage}: MIDAS {score} block mean ({weights})", xlabel="block",
           ylabel=f"block mean of {SCORE_NAMES.get(score, score)}")
    ax.title.set_fontsize(9)


def plot_midas_heatmap(path: Path, out: Path, block: str = "cross", score: str = "attattr") -> Path:
    """Layer x head heatmap of one block's mean score in one table."""
    from memefx.attribution.midas import block_summary

    table = pd.read_parquet(path, filters=[("score", "==", score), ("block", "==", block)])
    grid = block_summary(table, by=("layer", "head")).pivot(index="layer", columns="head", values="mean")
    values = grid.to_numpy()
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 + 0.6 * grid.shape[1]), max(3.5, 1.5 + 0.45 * grid.shape[0])))
    lim = float(np.nanmax(np.abs(values))) or 1.0
    im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title=f"{path.stem}: {block} block, mean {SCORE_NAMES.get(score, score)}",
           xticks=range(grid.shape[1]), yticks=range(grid.shape[0]), yticklabels=grid.index)
    ax.title.set_fontsize(9)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(f"block mean of {SCORE_NAMES.get(score, score)}", fontsize=8)
    zero = [int(layer) for layer, row in zip(grid.index, values) if np.all(row == 0)]
    if zero and score != "attention":
        # the classifier reads [CLS] only, so in the last layer no other query row reaches it: blocks
        # without a [CLS] row get no gradient there (exactly 0), which says nothing about attention
        fig.text(0.01, 0.01, f"layer {', '.join(map(str, zero))}: exactly 0. In the last layer only the [CLS] row reaches\n"
                 "the classifier, and this block holds no [CLS] row: its entries get no gradient.", fontsize=7,
                 ha="left", va="bottom")
    return _save(fig, out / f"{path.stem}_{block}_heatmap.png", rect=(0, 0.12 if zero else 0, 1, 1))


def stratum_analysis(run_dir: Path, table_path: Path, miate: dict) -> dict | None:
    """Stratum MIDAS features of the evaluated split joined with its miATE rows, and the AUC of
    predicting miATE_g >= 0.5 (grouped by anchor; the leaky row split for comparison)."""
    from memefx.attribution.analysis import predict_strong_effect, stratum_features
    from memefx.data.strata import strata_members
    from memefx.data.tables import read_confounders

    conf = _run_confounders(run_dir)
    if conf is None:
        return None
    members = strata_members(read_confounders(conf))
    members = members[members.split == miate["split"]]
    rows = pd.DataFrame([{"kind": k, **r} for k in KINDS for r in miate.get(k, {}).get("strata", [])])
    if rows.empty:
        return None
    features = stratum_features(pd.read_parquet(table_path), members)
    return predict_strong_effect(features, rows)


def _run_confounders(run_dir: Path) -> Path | None:
    """The confounder table a run used, as recorded in its provenance (synthetic default included)."""
    for name in (PROVENANCE, staged(PROVENANCE, "test"), staged(PROVENANCE, "validate")):
        path = run_dir / name
        if path.is_file():
            recorded = ((read_json(path).get("data") or {}).get("tables") or {}).get("confounders")
            if recorded and Path(recorded).is_file():
                return Path(recorded)
    return None


def _save(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    fig.tight_layout(rect=rect)
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


def is_run_directory(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in
                                 (CONFIG, PROVENANCE, METRICS, PREDICTIONS, MIATE))


def write_report(run_dir: str | Path) -> Path:
    """Write ``report/report.md`` and its PNG plots; return the markdown path."""
    run_dir = Path(run_dir)
    from memefx.report.study import is_study_directory, write_study_report

    if is_study_directory(run_dir):  # a study folder (memefx study): its seeds side by side
        return write_study_report(run_dir)
    if not is_run_directory(run_dir):
        raise UserError(f"{run_dir} is not a memefx run directory (no config.yaml, provenance.json, metrics.json, "
                        "predictions/ or miate/): give the folder passed as --trainer.default_root_dir")
    out = run_dir / REPORT
    out.mkdir(parents=True, exist_ok=True)
    miates = [read_json(p) for p in sorted((run_dir / MIATE).glob("*.json"))]
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
    metrics = read_json(run_dir / METRICS) if (run_dir / METRICS).is_file() else {}
    md = [f"# memefx report: {run_dir}", ""]
    if metrics:
        md += ["| metric | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())] + [""]
    for path in sorted(run_dir.glob("metrics_*.json")):  # `memefx validate|test` run later, beside the fit's
        stage = path.stem.removeprefix("metrics_")
        record = run_dir / staged(PROVENANCE, stage)
        weights = (read_json(record).get("weights") or {}).get("description") if record.is_file() else None
        md += [f"`memefx {stage}`" + (f" on {weights}" if weights else "") + f" ({path.name}):", "",
               "| metric | value |", "|---|---:|"]
        md += [f"| {k} | {_fmt(v)} |" for k, v in sorted(read_json(path).items())] + [""]
    md += ["## miATE", "", miate_table(miates), ""]
    if note:
        md += [f"_{note}_", ""]
    tables = midas_tables(run_dir)
    if tables:
        md += ["## MIDAS", ""]
        plots.append(plot_midas_curves(tables, out))
        evals = [(k, p) for k, p in tables.items() if k[0] in ("val", "test")]
        if evals:
            # the table of the weights the miATE files describe: a checkpoint evaluated after the fit, else
            # the last validation epoch
            (stage, epoch, _), last = max(evals, key=lambda kv: (kv[0][0] == "val", kv[0][2], kv[0][1]))
            plots.append(plot_midas_heatmap(last, out))
            # the miATE of the same stage; a lone miATE file is unambiguous (val and test on one split)
            match = [m for m in miates if m.get("stage") == stage] or (miates if len(miates) == 1 else [])
            analysis = stratum_analysis(run_dir, last, match[0]) if match else None
            if analysis:
                md += [f"Predicting miATE_g >= 0.5 from stratum MIDAS features ({last.name}, "
                       f"{analysis['n_strata']} strata, {analysis['n_positive']} positive):", ""]
                for name in ("grouped", "row_split_leaky"):
                    if name in analysis:
                        r = analysis[name]
                        md.append(f"- {name}: AUC {_fmt(r['auc'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
                if "note" in analysis:
                    md.append(f"- {analysis['note']}")
                md.append("")
                (out / "stratum_analysis.json").write_text(dumps(analysis, indent=2))
    md += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
