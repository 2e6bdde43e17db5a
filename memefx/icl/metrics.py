"""Accuracy and ATE of LLM answers per shot count (SPEC section 5).

For a prediction column p and ``ground_truth`` y over answer rows: accuracy = mean(p == y) and
ATE = mean(p | y = 1) - mean(p | y = 0). Variants: ``all`` rows as labeled; ``ttc_flipped`` (non-functional
rows count as wrong: p = 1 - y); ``functional_only`` (rows with is_functional = 1).
"""

from __future__ import annotations

import math

import pandas as pd

TARGETS = ("is_hateful", "is_hateful_or_sarcastic")


def _scores(pred: pd.Series, truth: pd.Series) -> dict:
    n = len(pred)
    pos, neg = pred[truth == 1], pred[truth == 0]
    return {
        "n": int(n),
        "accuracy": float((pred == truth).mean()) if n else math.nan,
        "ate": float(pos.mean() - neg.mean()) if len(pos) and len(neg) else math.nan,
    }


def answer_metrics(rows: pd.DataFrame, parsed: bool = False) -> dict:
    """Metrics of one group of rows for both targets and the three variants."""
    prefix = "parsed_" if parsed else ""
    truth = rows["ground_truth"].astype(int)
    functional = rows[f"{prefix}is_functional"].astype(int)
    out = {"n": int(len(rows))}
    for target in TARGETS:
        column = f"{prefix}{target}"
        if column not in rows and target == "is_hateful_or_sarcastic":
            pred = (rows[f"{prefix}is_hateful"].astype(int) | rows[f"{prefix}is_sarcastic"].astype(int))
        else:
            pred = rows[column].astype(int)
        flipped = pred.where(functional == 1, 1 - truth)
        keep = functional == 1
        out[target] = {"all": _scores(pred, truth), "ttc_flipped": _scores(flipped, truth),
                       "functional_only": _scores(pred[keep], truth[keep])}
    return out


def shot_table(answers: pd.DataFrame, parsed: bool = False) -> dict:
    """Per shot count (``few_shot_num``) and pooled over few-shot rows (k >= 1)."""
    missing = [c for c in ("few_shot_num", "ground_truth") if c not in answers]
    if missing:
        raise ValueError(f"answers table lacks columns {missing} (has {list(answers.columns)})")
    if answers.empty:
        raise ValueError("answers table has no rows: nothing to tabulate (did the run or the parse write any?)")
    unlabeled = answers[~answers.ground_truth.isin([0, 1])]
    if len(unlabeled):  # e.g. a replayed pair that mapped to no meme (-1): it would count as a wrong answer
        first = unlabeled.iloc[0]
        where = f"image_id {first['image_id']}, " if "image_id" in unlabeled else ""
        pair = f", pair #{first['ans_num']}" if "ans_num" in unlabeled else ""
        raise ValueError(f"{len(unlabeled)} answer rows have a ground_truth other than 0/1 (first: {where}"
                         f"{first['few_shot_num']}-shot{pair}, ground_truth {first['ground_truth']}): pairs without a "
                         "gold label (a replay's unmapped pairs, an unlabeled split) cannot be scored; drop them first")
    table = {f"{int(k)}_shot": answer_metrics(rows, parsed) for k, rows in answers.groupby("few_shot_num")}
    few = answers[answers.few_shot_num >= 1]
    if len(few):
        table["few_shot_pooled"] = answer_metrics(few, parsed)
    return table
