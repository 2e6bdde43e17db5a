"""Stratum MIDAS features and the grouped evaluation of predicting a strong effect."""

from __future__ import annotations

import numpy as np
import pandas as pd

from memefx.attribution.analysis import predict_strong_effect, stratum_features
from memefx.attribution.midas import to_table


def _table(ids, values):
    reduced = {"attattr": values, "count": np.full((len(ids), 4), 2.0)}
    return to_table(ids, reduced, epoch=0, stage="val", layers=[0, 1])


def test_features_are_hateful_minus_benign_block_means_per_layer():
    ids = ["00001", "00002", "00003"]
    values = np.arange(3 * 2 * 1 * 4, dtype=float).reshape(3, 2, 1, 4)
    members = pd.DataFrame({"id": ids, "kind": "shared_image", "stratum": 7, "anchor": "00001", "label": [1, 0, 0]})
    feats = stratum_features(_table(ids, values), members)
    assert list(feats.columns[:3]) == ["kind", "stratum", "anchor"]
    assert list(feats.columns[3:7]) == ["text_L0", "image_L0", "cross_L0", "special_L0"]
    expected = values[0] / 2 - (values[1] + values[2]) / 4  # means: sum / count(2), benign averaged
    assert np.allclose(feats.iloc[0, 3:].to_numpy(dtype=float), expected[:, 0, :].ravel())


def test_planted_signal_is_found_with_grouped_folds():
    rng = np.random.default_rng(0)
    n = 120
    anchors = np.repeat([f"{i:05d}" for i in range(n // 2)], 2)  # two kinds share each anchor
    signal = rng.normal(size=n)
    feats = pd.DataFrame({"kind": np.tile(["shared_image", "shared_text"], n // 2), "stratum": np.arange(n),
                          "anchor": anchors, "cross_L0": signal, "text_L0": rng.normal(size=n)})
    miate = pd.DataFrame({"kind": feats.kind, "stratum": feats.stratum,
                          "miate": 0.5 + 0.3 * signal + 0.1 * rng.normal(size=n)})
    result = predict_strong_effect(feats, miate, n_bootstrap=200)
    assert result["grouped"]["auc"] > 0.85
    assert result["grouped"]["ci_low"] < result["grouped"]["auc"] < result["grouped"]["ci_high"]
    noise = predict_strong_effect(feats.assign(cross_L0=rng.normal(size=n)), miate, n_bootstrap=200)
    assert noise["grouped"]["auc"] < 0.7


def test_single_outcome_class_is_reported_not_crashed():
    feats = pd.DataFrame({"kind": "shared_image", "stratum": range(12), "anchor": [str(i) for i in range(12)],
                          "cross_L0": range(12)})
    result = predict_strong_effect(feats, feats.assign(miate=0.9)[["kind", "stratum", "miate"]])
    assert "note" in result and "grouped" not in result
