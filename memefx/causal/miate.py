"""miATE, the multimodal intersectional average treatment effect (SPEC section 2).

For a stratum g (memes that share a picture, or a text, with both labels present)::

    e+_g = mean p over hateful members,  e-_g = mean p over benign members,  miATE_g = e+_g - e-_g

The estimate is the unweighted mean over strata with its standard error and a seeded stratum-bootstrap
95% interval; the member-weighted mean, a placebo refuter and the curve of the mean over thresholds are
reported beside it. The pure functions work on pandas frames (no torch: ``memefx miate`` starts fast);
``memefx.causal.miate_metric.MiATE`` is the torchmetrics shell.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from memefx.stats import percentile_interval

DEFAULT_TAUS = tuple(np.round(np.linspace(-1.0, 1.0, 21), 2).tolist())


def stratum_effects(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Per-stratum effects from member rows with columns ``stratum, label, p`` (optionally ``correct``).

    Returns the effects (stratum, size, n_hateful, n_benign, e_pos, e_neg, miate, all_correct) and the
    counts of what was skipped, so nothing is dropped silently: unlabeled members (-1) and strata left
    with a single label.
    """
    if rows["p"].isna().any():
        bad = rows[rows["p"].isna()]
        raise ValueError(f"{len(bad)} NaN probabilities (first ids: {bad.get('id', bad.index).tolist()[:10]})")
    skipped = {"unlabeled_members": int((rows.label < 0).sum())}
    rows = rows[rows.label >= 0]
    if "correct" not in rows:
        rows = rows.assign(correct=(rows.p >= 0.5).astype(int) == rows.label)
    grouped = rows.groupby("stratum")
    effects = pd.DataFrame({
        "size": grouped.size(),
        "n_hateful": grouped.label.sum(),
        "e_pos": rows[rows.label == 1].groupby("stratum").p.mean(),
        "e_neg": rows[rows.label == 0].groupby("stratum").p.mean(),
        "all_correct": grouped.correct.all(),
    }).reset_index()
    effects["n_benign"] = effects["size"] - effects["n_hateful"]
    one_label = effects.e_pos.isna() | effects.e_neg.isna()
    skipped["one_label_strata"] = int(one_label.sum())
    effects = effects[~one_label].copy()
    effects["miate"] = effects.e_pos - effects.e_neg
    cols = ["stratum", "size", "n_hateful", "n_benign", "e_pos", "e_neg", "miate", "all_correct"]
    return effects[cols].reset_index(drop=True), skipped


def select(effects: pd.DataFrame, threshold: float | None = None, correct_only: bool = False,
           pairs_only: bool = False) -> pd.DataFrame:
    """Apply the recorded selection options (all off by default; ``threshold`` selects on the outcome)."""
    keep = pd.Series(True, index=effects.index)
    if threshold is not None:
        keep &= effects.miate >= threshold
    if correct_only:
        keep &= effects.all_correct
    if pairs_only:
        keep &= effects["size"] == 2
    return effects[keep]


def bootstrap_interval(values: np.ndarray, n_bootstrap: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean from resampling strata with replacement (seeded)."""
    if len(values) == 0 or n_bootstrap <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(n_bootstrap, len(values)))  # all resamples at once: a mean is cheap
    return percentile_interval(values[draws].mean(axis=1), level)


def summarize(effects: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Unweighted mean over strata, standard error, bootstrap interval and member-weighted mean."""
    values = effects.miate.to_numpy(dtype=float)
    n = len(values)
    lo, hi = bootstrap_interval(values, n_bootstrap, seed)
    return {
        "n_strata": n,
        "n_members": int(effects["size"].sum()),
        "mean": float(values.mean()) if n else math.nan,
        "se": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "weighted_mean": float(np.average(values, weights=effects["size"])) if n else math.nan,
    }


def placebo(rows: pd.DataFrame, seed: int = 0, n_permutations: int = 50) -> dict:
    """miATE after permuting labels within each stratum, a refuter whose expectation is 0.

    Returns the mean over ``n_permutations`` seeded permutations and their standard deviation (one
    permutation of a few dozen strata is noisy: its spread is about that of the estimate itself).
    """
    rng = np.random.default_rng(seed)
    rows = rows[rows.label >= 0].sort_values(["stratum", "p"], kind="stable")[["stratum", "label", "p"]]
    starts = rows.groupby("stratum", sort=False).cumcount().to_numpy() == 0
    bounds = np.flatnonzero(np.append(starts, True))
    labels = rows.label.to_numpy()
    means = []
    for _ in range(n_permutations):
        permuted = labels.copy()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            permuted[lo:hi] = rng.permutation(permuted[lo:hi])
        effects, _ = stratum_effects(rows.assign(label=permuted))
        means.append(effects.miate.mean())
    return {"mean": float(np.mean(means)), "sd": float(np.std(means)), "n_permutations": n_permutations}


def threshold_curve(effects: pd.DataFrame, taus: tuple[float, ...] = DEFAULT_TAUS) -> list[dict]:
    """Mean over strata kept by ``miate_g >= tau`` for each tau: shows how a cut biases the mean."""
    out = []
    for tau in taus:
        kept = effects[effects.miate >= tau].miate
        out.append({"tau": float(tau), "n_strata": int(len(kept)), "mean": float(kept.mean()) if len(kept) else None})
    return out


def miate(rows: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0, threshold: float | None = None,
          correct_only: bool = False, pairs_only: bool = False, per_stratum: bool = True) -> dict:
    """Everything memefx reports for one kind: estimate, interval, options, skips, placebo, curve, rows."""
    effects, skipped = stratum_effects(rows)
    chosen = select(effects, threshold, correct_only, pairs_only)
    skipped["deselected_strata"] = int(len(effects) - len(chosen))
    result = summarize(chosen, n_bootstrap, seed)
    result.update({
        "options": {"threshold": threshold, "correct_only": correct_only, "pairs_only": pairs_only,
                    "n_bootstrap": n_bootstrap, "seed": seed},
        "skipped": skipped,
        "placebo": placebo(rows[rows.stratum.isin(chosen.stratum)], seed) if len(chosen) else None,
        "threshold_curve": threshold_curve(effects),
    })
    if per_stratum:
        result["strata"] = chosen.assign(all_correct=chosen.all_correct.astype(bool)).to_dict("records")
    return result


def miate_from_predictions(predictions: pd.DataFrame, members: pd.DataFrame, kind: str, split: str,
                           **options) -> dict:
    """miATE of a predictions table (id, label, p_hateful) on the strata of one split and kind.

    ``members`` comes from ``memefx.data.strata.strata_members``. Stratum members without a prediction
    and predictions for ids outside the confounder table are errors that list the ids.
    """
    chosen = members[(members.split == split) & (members.kind == kind)]
    if predictions.id.duplicated().any():
        raise ValueError(f"predictions list ids twice: {predictions[predictions.id.duplicated()].id.tolist()[:10]}")
    missing = sorted(set(chosen.id) - set(predictions.id))
    if missing:
        raise ValueError(f"{len(missing)} {kind} stratum members of {split!r} have no prediction: {missing[:10]}")
    rows = chosen.merge(predictions.rename(columns={"label": "label_pred"}), on="id")
    clash = rows[rows.label_pred != rows.label]
    if len(clash):
        raise ValueError(f"{len(clash)} labels in predictions disagree with the confounder table: {clash.id.tolist()[:10]}")
    return miate(rows.rename(columns={"p_hateful": "p"})[["id", "stratum", "label", "p"]], **options)
