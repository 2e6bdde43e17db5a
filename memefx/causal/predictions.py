"""miATE of any model's scores: a predictions table checked, labelled and analysed (pure pandas).

The input is one row per meme with an id, a hateful probability and, optionally, a label. It can come from
a memefx run (``predictions/<split>.parquet``), an LLM scoring run or another toolkit. Labels missing from
the file (no column, empty, or -1) are taken from the confounder table; a label that disagrees with the
table is an error. Nothing is dropped: ids outside the table, stratum members without a score, duplicate
ids and missing scores are errors that list the ids.

Reading files and the confounder table happens in the caller (``memefx.report.miate_cli``): this module
imports only pandas, scikit-learn and ``memefx.causal``.
"""

from __future__ import annotations

import math

import pandas as pd

from memefx.causal.miate import miate_from_predictions

UNLABELED = -1
_SHOW = 10


class PredictionsError(ValueError):
    """A predictions table that cannot be analysed; the message lists the offending ids or columns."""


def _ids(values) -> str:
    values = list(values)
    return ", ".join(map(str, values[:_SHOW])) + (", ..." if len(values) > _SHOW else "")


def check_predictions(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate a frame with columns ``id`` (normalized strings), ``p_hateful`` and optional ``label``.

    Returns ``id, label, p_hateful`` with label -1 where the file gives none. Errors: duplicate ids,
    missing (NaN) or non-numeric scores, scores outside [0, 1], labels other than 0, 1, -1 or empty.
    """
    for col in ("id", "p_hateful"):
        if col not in frame.columns:
            raise PredictionsError(f"{where}: no column {col!r} (has {list(frame.columns)})")
    if frame.empty:
        raise PredictionsError(f"{where}: no predictions (the table has no rows)")
    dup = frame[frame.id.duplicated(keep=False)]
    if len(dup):
        raise PredictionsError(f"{where}: {dup.id.nunique()} ids appear more than once: {_ids(dup.id.unique())}; "
                               "keep one score per meme (select one split or de-duplicate the file)")
    scores = pd.to_numeric(frame.p_hateful, errors="coerce")
    text = frame[scores.isna() & frame.p_hateful.notna()]
    if len(text):
        shown = _ids(f"{i}={v!r}" for i, v in zip(text.id, text.p_hateful))
        raise PredictionsError(f"{where}: {len(text)} scores are not numbers: {shown}")
    missing = frame[scores.isna()]
    if len(missing):
        raise PredictionsError(f"{where}: {len(missing)} memes have no score (NaN): ids {_ids(missing.id)}; "
                               "score every meme or remove those rows")
    outside = frame[(scores < 0) | (scores > 1)]
    if len(outside):
        shown = _ids(f"{i}={v}" for i, v in zip(outside.id, scores[outside.index]))
        raise PredictionsError(f"{where}: {len(outside)} scores outside [0, 1] ({shown}); miATE needs hateful "
                               "probabilities: apply a sigmoid/softmax to logits first")
    if "label" in frame.columns:
        labels = pd.to_numeric(frame.label, errors="coerce")
        bad = frame[(labels.notna() & ~labels.isin([0, 1, UNLABELED])) | (labels.isna() & frame.label.notna())]
        if len(bad):
            shown = _ids(f"{i}={v!r}" for i, v in zip(bad.id, bad.label))
            raise PredictionsError(f"{where}: {len(bad)} labels are not 0, 1, -1 or empty: {shown}")
        labels = labels.fillna(UNLABELED).astype(int)
    else:
        labels = pd.Series(UNLABELED, index=frame.index)
    return pd.DataFrame({"id": frame.id.astype(str), "label": labels.astype(int), "p_hateful": scores.astype(float)})


def choose_split(predictions: pd.DataFrame, table: pd.DataFrame, where: str) -> str:
    """The one split of the confounder table that holds every predicted id (else an error saying why)."""
    ids = set(predictions.id)
    covering = [s for s, rows in table.groupby("split") if ids <= set(rows.id)]
    if len(covering) == 1:
        return covering[0]
    if covering:
        raise PredictionsError(f"{where}: every id is in several splits of the confounder table ({covering}): "
                               "name one with --split")
    best = max(table.groupby("split"), key=lambda kv: len(ids & set(kv[1].id)))
    absent = sorted(ids - set(best[1].id))
    raise PredictionsError(f"{where}: no split of the confounder table holds every id; the closest, {best[0]!r}, "
                           f"lacks {len(absent)}: {_ids(absent)}. Name the split with --split")


def attach_labels(predictions: pd.DataFrame, table: pd.DataFrame, split: str, where: str,
                  table_name: str) -> tuple[pd.DataFrame, int]:
    """Fill missing labels from the confounder table's rows of ``split``.

    Returns the labelled predictions and how many labels came from the table. Ids absent from the table
    and labels that disagree with it are errors listing the ids.
    """
    rows = table[table.split == split]
    if rows.empty:
        raise PredictionsError(f"{table_name}: no rows for split {split!r} (splits: {sorted(table.split.unique())})")
    lookup = dict(zip(rows.id, rows.label.astype(int)))
    absent = [i for i in predictions.id if i not in lookup]
    if absent:
        raise PredictionsError(f"{where}: {len(absent)} ids are not in split {split!r} of {table_name}: {_ids(absent)}; "
                               "check --split and --id-col, or use the confounder table of this dataset")
    from_table = predictions.id.map(lookup).astype(int)
    given = predictions.label
    clash = predictions[(given != UNLABELED) & (from_table != UNLABELED) & (given != from_table)]
    if len(clash):
        shown = _ids(f"{i}: file {a}, table {lookup[i]}" for i, a in zip(clash.id, clash.label))
        raise PredictionsError(f"{where}: {len(clash)} labels disagree with {table_name} ({shown})")
    filled = given.where(given != UNLABELED, from_table)
    n_filled = int(((given == UNLABELED) & (from_table != UNLABELED)).sum())
    return predictions.assign(label=filled.astype(int)), n_filled


def classification(predictions: pd.DataFrame) -> dict:
    """AUROC and accuracy (threshold 0.5) over the labelled rows; NaN where one class is absent."""
    from sklearn.metrics import roc_auc_score

    labelled = predictions[predictions.label >= 0]
    both = labelled.label.nunique() == 2
    return {
        "n_predictions": int(len(predictions)),
        "n_labeled": int(len(labelled)),
        "auroc": float(roc_auc_score(labelled.label, labelled.p_hateful)) if both else math.nan,
        "accuracy": float(((labelled.p_hateful >= 0.5).astype(int) == labelled.label).mean()) if len(labelled)
        else math.nan,
    }


def predictions_miate(predictions: pd.DataFrame, members: pd.DataFrame, split: str, kinds: tuple[str, ...],
                      **options) -> dict:
    """The full miATE result of labelled predictions on one split: both kinds, as a run writes it.

    ``members``: ``memefx.data.strata.strata_members`` of the confounder table. Each kind holds the
    estimate, SE, bootstrap interval, member-weighted mean, placebo, threshold curve, options, skipped
    counts and per-stratum rows. Stratum members without a score are an error listing them.
    """
    result: dict = {"split": split, **classification(predictions)}
    for kind in kinds:
        try:
            result[kind] = miate_from_predictions(predictions, members, kind, split, **options)
        except ValueError as err:
            raise PredictionsError(f"split {split!r}: {err}") from None
    return result

