"""Stratum-level MIDAS joined with miATE, and how well block features predict a strong effect.

The published analysis predicted miATE_g >= 0.5 from attention features with a split that put strata of
the same hateful anchor on both sides. Here folds are grouped by anchor (``GroupKFold``), the leaky row
split is reported beside it for comparison, and each AUC has a bootstrap interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from memefx.attribution.masks import BLOCKS
from memefx.stats import bootstrap, percentile_interval


def stratum_features(table: pd.DataFrame, members: pd.DataFrame, score: str = "attattr") -> pd.DataFrame:
    """Per (kind, stratum): hateful-minus-benign block means per layer, columns ``<block>_L<layer>``.

    ``members``: id, kind, stratum, anchor, label rows of one split (``strata_members``).
    """
    rows = table[table.score == score]
    pooled = rows.groupby(["id", "layer", "block"])[["sum", "count"]].sum()
    means = (pooled["sum"] / pooled["count"].where(pooled["count"] > 0)).unstack(["layer", "block"])
    means.columns = [f"{block}_L{layer}" for layer, block in means.columns]
    joined = members.merge(means, left_on="id", right_index=True)
    cols = list(means.columns)
    keys = ["kind", "stratum", "anchor"]
    pos = joined[joined.label == 1].groupby(keys)[cols].mean()
    neg = joined[joined.label == 0].groupby(keys)[cols].mean()
    out = (pos - neg).dropna(how="all").reset_index()
    order = sorted(cols, key=lambda c: (int(c.rsplit("_L", 1)[1]), BLOCKS.index(c.rsplit("_L", 1)[0])))
    return out[keys + order]


def _auc_interval(y: np.ndarray, score: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float]:
    def auc(idx: np.ndarray) -> float | None:
        return roc_auc_score(y[idx], score[idx]) if len(np.unique(y[idx])) == 2 else None

    return percentile_interval(bootstrap(auc, len(y), n_bootstrap, seed))


def predict_strong_effect(features: pd.DataFrame, miate_rows: pd.DataFrame, threshold: float = 0.5,
                          n_splits: int = 5, n_bootstrap: int = 500, seed: int = 0) -> dict:
    """AUC of a logistic model predicting ``miate_g >= threshold`` from stratum MIDAS features.

    ``miate_rows``: kind, stratum, miate. Returns the grouped (by anchor) and the leaky (row) results.
    """
    data = features.merge(miate_rows[["kind", "stratum", "miate"]], on=["kind", "stratum"])
    cols = [c for c in features.columns if "_L" in c]
    x = data[cols].fillna(0.0).to_numpy()
    y = (data.miate >= threshold).astype(int).to_numpy()
    result = {"n_strata": int(len(data)), "n_positive": int(y.sum()), "threshold": threshold, "features": len(cols)}
    if len(np.unique(y)) < 2 or len(data) < 2 * n_splits:
        result["note"] = "too few strata or a single outcome class: no AUC"
        return result
    result.update(grouped_and_leaky_auc(x, y, data.anchor.to_numpy(), n_splits, n_bootstrap, seed))
    return result


def grouped_and_leaky_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int = 5,
                          n_bootstrap: int = 500, seed: int = 0) -> dict:
    """Out-of-fold AUC (with a bootstrap interval) of a standardized logistic model, folds grouped by
    ``groups`` and, for comparison, the row split that lets one group's rows sit on both sides."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    result = {}
    splits = min(n_splits, len(np.unique(groups)))
    for name, cv in (("grouped", GroupKFold(n_splits=splits)),
                     ("row_split_leaky", KFold(n_splits=n_splits, shuffle=True, random_state=seed))):
        proba = cross_val_predict(model, x, y, cv=cv, groups=groups if name == "grouped" else None,
                                  method="predict_proba")[:, 1]
        lo, hi = _auc_interval(y, proba, n_bootstrap, seed)
        result[name] = {"auc": float(roc_auc_score(y, proba)), "ci_low": lo, "ci_high": hi}
    return result
