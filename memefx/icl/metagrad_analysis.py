"""Which meta-gradient features predict answer outcomes (functional, formatted, correct label)?

Rows of one target group share their features, so folds are grouped by group (``image_id``); the
published row split, which leaks a group's features into both sides, is reported beside it, labeled.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from memefx.attribution.analysis import grouped_and_leaky_auc

_NAME = re.compile(r"^L(\d+)_H\d+_(.+?)(?:_(zs|delta))?$")


def outcomes(answers: pd.DataFrame) -> pd.DataFrame:
    """is_functional, is_formatted and correct (the hateful verdict equals the gold label) per answer row."""
    out = answers[["image_id", "few_shot_num"]].copy()
    for column in ("is_functional", "is_formatted"):
        out[column] = answers[column].astype(int)
    out["correct"] = (answers["is_hateful"].astype(int) == answers["ground_truth"].astype(int)).astype(int)
    return out


def analyse(features: pd.DataFrame, answers: pd.DataFrame, n_bootstrap: int = 300, seed: int = 0) -> dict:
    """AUC per outcome (grouped and leaky) and standardized-coefficient importance grouped by
    (feature kind, zero-shot / delta / dual, layer)."""
    data = outcomes(answers).merge(features, on=["image_id", "few_shot_num"])
    cols = [c for c in features.columns if c.startswith("L")]
    x = data[cols].fillna(0.0).to_numpy()
    groups = data.image_id.astype(str).to_numpy()
    result = {"rows": int(len(data)), "groups": int(len(np.unique(groups))), "features": len(cols), "outcomes": {}}
    for outcome in ("is_functional", "is_formatted", "correct"):
        y = data[outcome].to_numpy()
        entry = {"positive": int(y.sum())}
        if len(np.unique(y)) < 2 or len(np.unique(groups)) < 2:
            entry["note"] = "a single outcome class or group: no AUC"
        else:
            entry.update(grouped_and_leaky_auc(x, y, groups, n_bootstrap=n_bootstrap, seed=seed))
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x, y)
            weights = np.abs(model[-1].coef_[0])
            importance: dict[str, float] = {}
            for name, w in zip(cols, weights):
                layer, kind, phase = _NAME.match(name).groups()
                key = f"{kind}|{phase or 'dual'}|L{layer}"
                importance[key] = importance.get(key, 0.0) + float(w)
            entry["importance"] = dict(sorted(importance.items(), key=lambda kv: -kv[1]))
        result["outcomes"][outcome] = entry
    return result
