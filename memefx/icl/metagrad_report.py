"""``memefx icl metagrad`` as one function: features of a causal LM on answered prompts, their analysis
against the prompt-layout baseline, and a report that leads with baseline, features and gain."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import pandas as pd

from memefx.icl.metagrad_analysis import analyse, outcome_columns
from memefx.icl.metagrad_features import features_table


def read_answers(path: str | Path) -> pd.DataFrame:
    """An answers table (.parquet or .csv), or an error naming the path."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"memefx icl metagrad: answers table {p} not found")
    return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)


def run_metagrad(answers: str | Path, model: str, out: str | Path, layers: list[int] | None = None,
                 max_groups: int | None = None, features: Literal["ours", "published", "both"] = "ours",
                 published_protocol: bool = True, n_bootstrap: int = 200, seed: int = 0) -> Path:
    """Meta-gradient features and their analysis for every answered prompt.

    Args:
        answers: table (.parquet/.csv) with ``image_id, few_shot_num, prompt`` and the outcome labels
            ``is_functional, is_formatted, is_hateful, ground_truth`` (hand labels or parsed verdicts).
        model: local folder of the causal LM (Llama family) that answered; loaded with eager attention.
        out: folder for ``features.parquet``, ``analysis.json``, ``report.md`` and ``importance.png``.
        layers: layer indices to measure in our form (default: all); the published form is layer 0 only.
        max_groups: only the first N target groups (a quick look).
        features: ``ours`` (per-head means over the target's query tokens, dual-form norms),
            ``published`` (the reference study's per-token vectors, exactly as its code computed them), or
            ``both``.
        published_protocol: with published features, also fit the reference notebook's classifier on its
            row split (LightGBM tuned by Optuna; the extra ``memefx[lightgbm]``), reported beside the
            grouped analysis.
        n_bootstrap: resamples of target groups on which the whole cross-validation is refitted (the
            interval of the AUC gain); the analysis time grows linearly with it.
        seed: folds and bootstrap.

    Returns:
        The output folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = read_answers(answers)
    if "prompt" not in table:
        raise ValueError(f"{answers}: answers table has no 'prompt' column (has {list(table.columns)})")
    try:  # before any model forward: a table the analysis cannot read fails in seconds, not after the features
        outcome_columns(table)
    except ValueError as err:
        raise ValueError(f"{answers}: {err}") from None
    protocol = published_protocol and features in ("published", "both")
    if protocol:  # a missing extra fails here, before any forward
        from memefx.icl.metagrad_protocol import require_lightgbm

        require_lightgbm()
    if max_groups:
        table = table[table.image_id.isin(table.image_id.drop_duplicates().head(max_groups))]
    lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feats = features_table(table, lm, tok, layers, features)
    feats.to_parquet(out / "features.parquet", index=False)
    result = analyse(feats, table, n_bootstrap=n_bootstrap, seed=seed, published_protocol=protocol)
    result["feature_form"] = features
    if "published_vectors_cut" in feats.attrs:
        result["published_vectors_cut"] = int(feats.attrs["published_vectors_cut"])
        result["published_groups_without_kshot"] = [str(g) for g in feats.attrs["published_groups_without_kshot"]]
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    plot = importance_plot(result, out / "importance.png")
    (out / "report.md").write_text(report_markdown(result, plot.name if plot else None))
    print(f"memefx icl metagrad: {len(feats)} prompts, {result['feature_sets']} features -> {out}")
    return out


def _f(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _gain(r: dict, n_bootstrap: int) -> str:
    """Gain and interval; how many resamples gave one when some did not (a resample with one class)."""
    gain = r["gain"]
    text = "n/a" if gain is None or math.isnan(gain) else f"{gain:+.3f}"
    valid = r.get("bootstrap_valid", n_bootstrap)
    note = f" ({valid} of {n_bootstrap} resamples)" if valid < n_bootstrap else ""
    return f"{text} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]{note}"


def report_markdown(result: dict, plot: str | None = None) -> str:
    """``report.md``: layout baseline, layout + features and the gain first; beside them, labelled, the
    published protocol (when run); then per shot; then importance."""
    shots = ", ".join(f"{k}-shot: {n}" for k, n in result["shots"].items())
    sets = ", ".join(f"{name} ({n})" for name, n in result["feature_sets"].items())
    lines = [
        f"# Meta-gradient analysis: {result['rows']} answer rows, {result['groups']} target groups",
        "",
        f"Rows per shot count: {shots}. Feature sets (columns): {sets}.",
        f"Folds: {result['n_splits']} grouped by target group; regularisation chosen by inner grouped folds; "
        f"AUCs count pairs within a test fold (means over {result.get('n_repeats', 1)} repetitions with other "
        f"folds); 95% intervals: the whole cross-validation refitted on {result['n_bootstrap']} resamples of "
        f"target groups, baseline and features on the same resample.",
        *([f"Answer rows without a features row (left out): {result['answer_rows_without_features']}."]
          if result.get("answer_rows_without_features") else []),
        *([f"Outcomes from columns: {', '.join(f'{k} <- {v}' for k, v in result['outcome_columns'].items())}."]
          if result.get("outcome_columns") else []),
        "",
        "## Beyond the prompt layout",
        "",
        "Layout baseline: shot count, prompt length, number of pairs. Layout + features: the same model plus "
        "the features standardised within each shot count. Gain = the difference of the two AUCs; an "
        "interval that covers 0 means the features add nothing the layout did not already say.",
        "",
        "| outcome | features | layout baseline AUC | layout + features AUC | gain [95% CI] | P(gain <= 0) | "
        "features alone, raw, logistic: grouped / row split (leaky) |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    notes = []
    for outcome, entry in result["outcomes"].items():
        if "sets" not in entry:
            notes.append(f"- {outcome}: {entry.get('note', 'no AUC')} ({entry['positive']} positive of {entry['rows']})")
            continue
        for name, r in entry["sets"].items():
            alone = r["alone_raw"]
            lines.append(f"| {outcome} | {name} | {_f(entry['baseline']['auc'])} | {_f(r['auc_features'])} | "
                         f"{_gain(r, result['n_bootstrap'])} | {_f(r['p_gain_le_0'])} | "
                         f"{_f(alone['grouped'])} / {_f(alone['row_split_leaky'])} |")
    lines += [""] + notes + ([""] if notes else [])
    lines += _protocol_section(result)
    lines += ["## Within each shot count", "",
              "Shot count fixed: only prompt length and pairs are left in the baseline. Shots where an outcome "
              f"has fewer than {result['min_class_rows']} rows of a class get no AUC.", "",
              "| outcome | features | shots | rows (positive) | layout baseline AUC | layout + features AUC | gain [95% CI] |",
              "|---|---|---:|---|---:|---:|---|"]
    skipped = []
    for outcome, entry in result["outcomes"].items():
        for name, r in entry.get("sets", {}).items():
            for k, w in r["within_shot"].items():
                if "note" in w:
                    if name == next(iter(entry["sets"])):
                        skipped.append(f"{outcome} at {k} shots ({w['rows']} rows): {w['note']}")
                    continue
                lines.append(f"| {outcome} | {name} | {k} | {w['rows']} ({w['positive']}) | {_f(w['auc_baseline'])} | "
                             f"{_f(w['auc_features'])} | {_gain(w, result['n_bootstrap'])} |")
    if skipped:
        lines += ["", "No within-shot AUC:"] + [f"- {s}" for s in skipped]
    lines += ["", "## What the features add after the baseline", "",
              "Absolute standardised coefficients of the features in the layout + features model (layout "
              "columns fitted but not shown), summed by kind | zero-shot (zs), delta or dual | layer.", ""]
    for outcome, entry in result["outcomes"].items():
        for name, r in entry.get("sets", {}).items():
            top = ", ".join(f"{k} ({v:.2f})" for k, v in list(r["importance"].items())[:3])
            lines.append(f"- {outcome} / {name}: {top}")
    if plot:
        lines += ["", f"![importance]({plot})"]
    if result.get("published_vectors_cut"):
        lines += ["", f"Published form: {result['published_vectors_cut']} vectors longer than their pad length "
                  "(100 / 172 / 212) cut at the end, as the notebook's padding does."]
    if result.get("published_groups_without_kshot"):
        lines += ["", "Published form: groups without a k-shot prompt (delta set to 0): "
                  + ", ".join(result["published_groups_without_kshot"]) + "."]
    return "\n".join(lines) + "\n"


def _protocol_section(result: dict) -> list[str]:
    """The reference notebook's classifier and row split, labelled as such, after the headline tables."""
    entries = [(outcome, entry["sets"]["published"]["published_protocol"]) for outcome, entry in result["outcomes"].items()
               if "published_protocol" in entry.get("sets", {}).get("published", {})]
    if not entries:
        return []
    lines = ["## The published protocol (row split; beside the headline, not instead of it)", "",
             "The reference notebook's classifier on the published features: answer rows of 0-2 shots, LightGBM "
             "tuned by Optuna, 70/30 row split (then 80/20 train/validation), seed 1991. The row split puts rows "
             "of one target group, which share their features, on both sides; the same classifier on a split by "
             "target group is beside it. Published: 0.861 for is_functional (row split).", "",
             "| outcome | rows (positive) | test rows | AUC, row split (published protocol) | AUC, grouped split |",
             "|---|---|---:|---:|---:|"]
    for outcome, p in entries:
        if "row_split" not in p:
            lines.append(f"| {outcome} | {p['rows']} ({p['positive']}) | - | n/a | n/a |")
            continue
        lines.append(f"| {outcome} | {p['rows']} ({p['positive']}) | {p['row_split']['test']} | "
                     f"{_f(p['row_split']['auc'])} | {_f(p['grouped_split']['auc'])} |")
    return [*lines, ""]


def importance_plot(result: dict, path: Path) -> Path | None:
    """Bar charts of the top feature groups per outcome and feature set, fitted after the layout baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{outcome} / {name}", r["importance"]) for outcome, entry in result["outcomes"].items()
              for name, r in entry.get("sets", {}).items()]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, importance) in zip(axes.flat, panels):
        top = list(importance.items())[:10][::-1]
        ax.barh([k for k, _ in top], [v for _, v in top])
        ax.set(title=f"{title}\nafter the layout baseline", xlabel="|standardized coefficient|, summed")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
