"""``memefx miate``: causal analysis (miATE) of any model's predictions on the confounder strata.

    memefx miate --predictions FILE --confounders FILE [--split S] [--id-col id] [--score-col p_hateful]
                 [--label-col label] [--json] [--out DIR]

FILE is a CSV/TSV (any of comma, tab, semicolon), JSON (lines or an array) or parquet table with one score per meme: a memefx run's
``predictions/<split>.parquet``, an LLM scoring run (``p_hateful``) or another toolkit's output. Labels the
file lacks come from the confounder table. The result has the same form as a run's ``miate/<split>.json``
(both kinds: estimate, SE, bootstrap interval, member-weighted mean, placebo, threshold curve, options,
skipped counts, per-stratum rows). With ``--out``, ``<split>.json``, ``<split>_strata.csv`` and plots
are written there.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from memefx.causal.predictions import (
    PredictionsError,
    attach_labels,
    check_predictions,
    choose_split,
    predictions_miate,
)
from memefx.data.hmc import normalize_id
from memefx.data.strata import KINDS, strata_members
from memefx.data.tables import read_confounders
from memefx.jsonio import dumps


def read_table(path: str | Path, id_col: str) -> pd.DataFrame:
    """The predictions table (``memefx.table_io.read_table``), its errors as ``PredictionsError``."""
    from memefx.errors import UserError
    from memefx.table_io import read_table as read_any

    try:
        return read_any(path, text_columns=(id_col,))
    except UserError as err:
        raise PredictionsError(str(err)) from None


def load_predictions(path: str | Path, split: str | None = None, id_col: str = "id", score_col: str = "p_hateful",
                     label_col: str = "label", split_col: str = "split") -> tuple[pd.DataFrame, str | None]:
    """Read, select one split (when the file has a split column) and validate a predictions file.

    Returns the checked frame (``id, label, p_hateful``) and the split named by the file, if any.
    """
    raw = read_table(path, id_col)
    where = str(path)
    missing = [c for c in (id_col, score_col) if c not in raw.columns]
    if missing:
        raise PredictionsError(f"{where}: no column {missing} (has {list(raw.columns)}); "
                               "name the columns with --id-col / --score-col")
    file_split = None
    if split_col in raw.columns:
        present = sorted(raw[split_col].dropna().astype(str).unique())
        if split is not None:
            raw = raw[raw[split_col].astype(str) == split]
            if raw.empty:
                raise PredictionsError(f"{where}: no rows of split {split!r} (column {split_col!r} has {present})")
        elif len(present) > 1:
            raise PredictionsError(f"{where}: rows of several splits {present}: choose one with --split")
        file_split = split or (present[0] if present else None)
    raw = raw.reset_index(drop=True)
    frame = pd.DataFrame({
        "id": [normalize_id(v, f"{where} row {i + 1} ({id_col})") for i, v in enumerate(raw[id_col].tolist())],
        "p_hateful": raw[score_col],
    })
    if label_col in raw.columns:
        frame["label"] = raw[label_col]
    return check_predictions(frame, where), file_split


def analyse(predictions: str | Path, confounders: str | Path, split: str | None = None, id_col: str = "id",
            score_col: str = "p_hateful", label_col: str = "label", **options) -> dict:
    """The full miATE result of a predictions file (see the module docstring)."""
    preds, file_split = load_predictions(predictions, split, id_col, score_col, label_col)
    table = read_confounders(confounders)
    split = split or file_split or choose_split(preds, table, str(predictions))
    preds, n_filled = attach_labels(preds, table, split, str(predictions), str(confounders))
    result = predictions_miate(preds, strata_members(table), split, KINDS, **options)
    return {**result, "labels_from_table": n_filled, "source": str(predictions), "confounders": str(confounders)}


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """``<split>.json``, ``<split>_strata.csv`` (per-stratum rows of both kinds) and the plots."""
    from memefx.report.run import plot_threshold_curve

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = result["split"]
    paths = [out / f"{split}.json", out / f"{split}_strata.csv"]
    paths[0].write_text(dumps(result, indent=2))
    rows = [{"kind": k, **r} for k in KINDS for r in (result.get(k) or {}).get("strata", [])]
    pd.DataFrame(rows).to_csv(paths[1], index=False)
    paths.append(plot_threshold_curve(result, out))
    paths.append(plot_strata(result, out / f"{split}_strata.png"))
    return [p for p in paths if p is not None]


def plot_strata(result: dict, path: Path) -> Path | None:
    """Per kind: each stratum's mean p over hateful vs benign members, with the mean effect and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if (result.get(k) or {}).get("strata")]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        r = result[kind]
        strata = pd.DataFrame(r["strata"])
        ax.scatter(strata.e_neg, strata.e_pos, s=10 + 6 * strata["size"], alpha=0.6)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean p(hateful), benign members", ylabel="mean p(hateful), hateful members",
               title=f"{result['split']} {kind}: miATE {r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}], "
                     f"{r['n_strata']} strata")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def summary_lines(result: dict) -> list[str]:
    """A short readable summary: classification figures, then one line per kind."""
    lines = [f"split {result['split']}: {result['n_predictions']} predictions, {result['n_labeled']} labelled "
             f"({result['labels_from_table']} labels from the confounder table); AUROC {_fmt(result['auroc'])}, "
             f"accuracy {_fmt(result['accuracy'])}"]
    for kind in KINDS:
        r = result.get(kind) or {}
        placebo = r.get("placebo") or {}
        lines.append(f"  {kind}: miATE {_fmt(r.get('mean'))} [{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}] "
                     f"SE {_fmt(r.get('se'))}, {r.get('n_strata', 0)} strata, member-weighted "
                     f"{_fmt(r.get('weighted_mean'))}, placebo {_fmt(placebo.get('mean'))}")
    return lines


def miate_command(predictions: str, confounders: str, split: str | None = None, id_col: str = "id",
                  score_col: str = "p_hateful", label_col: str = "label", threshold: float | None = None,
                  correct_only: bool = False, pairs_only: bool = False, n_bootstrap: int = 1000, seed: int = 0,
                  json: bool = False, out: str | None = None) -> int:
    """miATE of any model's predictions on the confounder strata, with AUROC/accuracy.

    Args:
        predictions: CSV/TSV/JSON/parquet with one score per meme
        confounders: confounder table (id, split, label, img_org_id, txt_org_id)
        split: split of the confounder table (default: the file's split column, else the one split that
            holds every id)
        id_col: column of meme ids
        score_col: hateful probability in [0, 1]
        label_col: optional; missing labels come from the confounder table
        threshold: keep strata with miATE_g >= tau (biased: read the threshold curve)
        correct_only: keep strata whose members are all classified correctly
        pairs_only: keep two-member strata only
        n_bootstrap: stratum-bootstrap resamples of the interval (0: no interval)
        seed: seed of the bootstrap and the placebo
        json: print the full result as JSON
        out: folder for <split>.json, <split>_strata.csv and plots
    """
    from memefx.causal.predictions import PredictionsError

    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise PredictionsError(f"--threshold {threshold}: a stratum's miATE lies in [-1, 1]; a threshold outside "
                               "keeps every stratum or none (read the threshold curve instead)")
    if n_bootstrap < 0:
        raise PredictionsError(f"--n-bootstrap {n_bootstrap}: expected a number of resamples >= 0 (0: no interval)")
    result = analyse(predictions, confounders, split, id_col, score_col, label_col, n_bootstrap=n_bootstrap,
                     seed=seed, threshold=threshold, correct_only=correct_only, pairs_only=pairs_only)
    written = write_outputs(result, out) if out else []
    if json:
        print(dumps(result, indent=2))
    else:
        print("\n".join(summary_lines(result)))
        for path in written:
            print(f"wrote {path}")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``memefx miate``; bad input raises an error that the ``memefx`` command prints."""
    from memefx.typed_cli import run_typed

    return run_typed(miate_command, argv, "memefx miate")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
