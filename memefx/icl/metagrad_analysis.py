"""Do meta-gradient features predict answer outcomes beyond what the prompt layout already says?

The outcomes (functional, formatted, correct label) depend strongly on the shot count, and the delta and
dual-form features are exactly 0 at zero shots, so a classifier on raw features can score a high AUC by
recognising the shot count alone. This module therefore reports, per outcome and feature set:

- a **layout baseline**: a logistic model on the shot count (one-hot), prompt length (tokens) and number
  of pairs in the target;
- the **layout + features** model, features standardised within each shot count (so they carry no shot
  information of their own), with the same folds;
- the **gain** (AUC of layout + features minus AUC of the baseline) with a paired bootstrap interval that
  resamples target groups;
- the same within each shot count where both outcome classes have enough rows (and which shots do not);
- the features alone, raw, in a logistic model (grouped folds, and the leaky row split), to show how much
  of that figure the layout explains;
- with ``published_protocol``, for the published features, the reference notebook's own classifier and
  split (``memefx.icl.metagrad_protocol``: LightGBM tuned by Optuna on a row split), beside the rest.

Rows of one target group share their features, so every fold is grouped by ``image_id``; the
regularisation strength is chosen by an inner grouped cross-validation on the training folds only.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold

from memefx.stats import percentile_interval

LAYOUT = ("few_shot_num", "layout_prompt_tokens", "layout_pairs")
OUTCOMES = ("is_functional", "is_formatted", "correct")
FEATURE_SETS = {"ours": re.compile(r"^L\d+_H\d+_"), "published": re.compile(r"^L\d+_P_")}
_NAME = re.compile(r"^L(\d+)_(H\d+|P)_(.+?)(?:_(?:t\d+|mean|p\d+))?(?:_(zs|delta))?$")
CS = (0.01, 0.1, 1.0)


def outcome_columns(answers: pd.DataFrame) -> dict[str, str]:
    """Where each verdict comes from: the hand label ``is_<v>`` when the table has it, else the parser's
    ``parsed_is_<v>`` (``memefx icl parse`` output of a new model's run has no hand labels)."""
    found, missing = {}, []
    for verdict in ("is_functional", "is_formatted", "is_hateful"):
        column = verdict if verdict in answers else f"parsed_{verdict}"
        if column in answers:
            found[verdict] = column
        else:
            missing.append(f"{verdict} (or parsed_{verdict})")
    missing += [c for c in ("image_id", "few_shot_num", "ground_truth") if c not in answers]
    if missing:
        raise ValueError(f"answers table lacks columns {missing} (has {list(answers.columns)}): give hand labels "
                         "or the parsed verdicts of memefx icl parse")
    return found


def outcomes(answers: pd.DataFrame) -> pd.DataFrame:
    """is_functional, is_formatted and correct (the hateful verdict equals the gold label) per answer row,
    from hand labels or, where absent, parsed verdicts (``outcome_columns``)."""
    source = outcome_columns(answers)
    unlabeled = answers[~answers.ground_truth.isin([0, 1])]
    if len(unlabeled):  # "correct" needs a gold label (a replay's unmapped pair has -1)
        first = unlabeled.iloc[0]
        raise ValueError(f"{len(unlabeled)} answer rows have a ground_truth other than 0/1 (first: image_id "
                         f"{first['image_id']}, {first['few_shot_num']}-shot, ground_truth {first['ground_truth']}): "
                         "drop pairs without a gold label first")
    out = answers[["image_id", "few_shot_num"]].copy()
    for column in ("is_functional", "is_formatted"):
        out[column] = answers[source[column]].astype(int)
    out["correct"] = (answers[source["is_hateful"]].astype(int) == answers["ground_truth"].astype(int)).astype(int)
    return out


def feature_sets(columns) -> dict[str, list[str]]:
    """Feature columns by form: ``ours`` (L<l>_H<h>_...) and ``published`` (L<l>_P_...), those present."""
    sets = {name: [c for c in columns if pattern.match(c)] for name, pattern in FEATURE_SETS.items()}
    return {name: cols for name, cols in sets.items() if cols}


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (scikit-learn's; ties count one half); NaN with a single class instead of an error."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, score))


def _pair_matrices(y: np.ndarray, score: np.ndarray, group_ids: np.ndarray, n_groups: int,
                   strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group-by-group sums over (positive row of g, negative row of h) pairs in the same stratum:
    ``wins[g, h]`` of concordance (1 if the positive scores higher, 1/2 on a tie) and ``pairs[g, h]``."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    same = (strata[pos, None] == strata[None, neg]).astype(float)
    diff = score[pos, None] - score[None, neg]
    concord = ((diff > 0) + 0.5 * (diff == 0)) * same
    onehot_pos = np.zeros((n_groups, len(pos)))
    onehot_pos[group_ids[pos], np.arange(len(pos))] = 1.0
    onehot_neg = np.zeros((n_groups, len(neg)))
    onehot_neg[group_ids[neg], np.arange(len(neg))] = 1.0
    return onehot_pos @ concord @ onehot_neg.T, onehot_pos @ same @ onehot_neg.T


def paired_gain(y: np.ndarray, base: np.ndarray, feat: np.ndarray, groups: np.ndarray,
                strata: np.ndarray | None = None, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """AUC of two scores on the same rows and the gain ``feat - base``, with a 95% percentile interval from
    a paired bootstrap that resamples whole groups (both scores see the same resampled rows).

    With ``strata`` (the test fold of each row), only (positive, negative) pairs of the same stratum count:
    out-of-fold scores of different folds come from different models, and pooling them across folds
    biases the AUC of a model whose fold intercepts move against the fold's class balance. ``base``,
    ``feat`` and ``strata`` may be (R, n): R repetitions of the cross-validation with other folds; AUCs
    and gains are then means over the repetitions (the same resampled groups in each).
    """
    y, groups = np.asarray(y), np.asarray(groups)
    base, feat = np.atleast_2d(base), np.atleast_2d(feat)
    strata = np.zeros_like(base) if strata is None else np.atleast_2d(strata)
    ids, group_ids = np.unique(groups, return_inverse=True)
    mats = [(*_pair_matrices(y, b, group_ids, len(ids), s), _pair_matrices(y, f, group_ids, len(ids), s)[0])
            for b, f, s in zip(base, feat, strata)]  # (wins_base, pairs, wins_feat) per repetition
    total = mats[0][1].sum()
    result = {"rows": int(len(y)), "positive": int(y.sum()), "groups": int(len(ids)), "pairs": int(total),
              "repeats": len(mats)}
    if any(m[1].sum() == 0 for m in mats):
        return {**result, "auc_baseline": float("nan"), "auc_features": float("nan"), "gain": float("nan"),
                "ci_low": float("nan"), "ci_high": float("nan"), "p_gain_le_0": float("nan"), "bootstrap_valid": 0}
    result["auc_baseline"] = float(np.mean([wb.sum() / n.sum() for wb, n, _ in mats]))
    result["auc_features"] = float(np.mean([wf.sum() / n.sum() for _, n, wf in mats]))
    result["gain"] = result["auc_features"] - result["auc_baseline"]
    counts = np.random.default_rng(seed).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=n_bootstrap)

    def quad(matrix: np.ndarray) -> np.ndarray:
        return np.einsum("bg,gh,bh->b", counts, matrix, counts)

    gains = np.zeros(n_bootstrap)
    ok = np.ones(n_bootstrap, dtype=bool)
    for wins_base, pairs, wins_feat in mats:
        n_pairs = quad(pairs)
        ok &= n_pairs > 0
        gains += (quad(wins_feat) - quad(wins_base)) / np.where(n_pairs > 0, n_pairs, 1) / len(mats)
    gains = gains[ok]
    if len(gains):
        low, high = percentile_interval(gains)
        result.update(ci_low=low, ci_high=high, p_gain_le_0=float(np.mean(gains <= 0)), bootstrap_valid=int(len(gains)))
    else:
        result.update(ci_low=float("nan"), ci_high=float("nan"), p_gain_le_0=float("nan"), bootstrap_valid=0)
    return result


class _Standardizer:
    """z-scores learned on training rows, per shot count when ``shots`` is given (a shot count unseen in
    training falls back to the pooled statistics); constant columns map to 0."""

    def fit(self, x: np.ndarray, shots: np.ndarray | None = None) -> _Standardizer:
        self.pooled = self._stats(x)
        self.per_shot = {} if shots is None else {k: self._stats(x[shots == k]) for k in np.unique(shots)}
        return self

    @staticmethod
    def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sd = x.std(0)
        return x.mean(0), np.where(sd > 1e-12, sd, np.inf)

    def transform(self, x: np.ndarray, shots: np.ndarray | None = None) -> np.ndarray:
        if shots is None or not self.per_shot:
            mean, sd = self.pooled
            return (x - mean) / sd
        out = np.empty_like(x, dtype=float)
        for k in np.unique(shots):
            mean, sd = self.per_shot.get(k, self.pooled)
            out[shots == k] = (x[shots == k] - mean) / sd
        return out


def _design(layout: np.ndarray, feats: np.ndarray | None, shots: np.ndarray, train: np.ndarray, test: np.ndarray):
    lay = _Standardizer().fit(layout[train])
    parts_tr, parts_te = [lay.transform(layout[train])], [lay.transform(layout[test])]
    if feats is not None:
        within = _Standardizer().fit(feats[train], shots[train])
        parts_tr.append(within.transform(feats[train], shots[train]))
        parts_te.append(within.transform(feats[test], shots[test]))
    return np.hstack(parts_tr), np.hstack(parts_te)


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence notes on separable folds
        return LogisticRegression(C=c, solver="liblinear", intercept_scaling=10.0, max_iter=5000).fit(x, y)


def _choose_c(layout, feats, shots, y, groups, rows: np.ndarray, inner_splits: int = 3) -> float:
    """The C with the best mean AUC over grouped inner folds of ``rows`` (training rows only)."""
    n_groups = len(np.unique(groups[rows]))
    if n_groups < 2 or len(np.unique(y[rows])) < 2:
        return 1.0
    splits = list(GroupKFold(n_splits=min(inner_splits, n_groups)).split(rows, groups=groups[rows]))
    scores = []
    for c in CS:
        fold_aucs = []
        for tr, te in splits:
            tr, te = rows[tr], rows[te]
            if len(np.unique(y[tr])) < 2 or len(np.unique(y[te])) < 2:
                continue
            x_tr, x_te = _design(layout, feats, shots, tr, te)
            fold_aucs.append(auc(y[te], _fit(x_tr, y[tr], c).decision_function(x_te)))
        scores.append(np.mean(fold_aucs) if fold_aucs else -np.inf)
    return CS[int(np.argmax(scores))]


def out_of_fold(layout: np.ndarray, feats: np.ndarray | None, shots: np.ndarray, y: np.ndarray, groups: np.ndarray,
                folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Out-of-fold decision scores of the logistic model on layout (+ within-shot standardised features)."""
    score = np.full(len(y), np.nan)
    for train, test in folds:
        if len(np.unique(y[train])) < 2:
            score[test] = float(y[train][0])
            continue
        c = _choose_c(layout, feats, shots, y, groups, train)
        x_tr, x_te = _design(layout, feats, shots, train, test)
        score[test] = _fit(x_tr, y[train], c).decision_function(x_te)
    return score


def stratified_auc(y: np.ndarray, score: np.ndarray, strata: np.ndarray) -> float:
    """AUC over (positive, negative) pairs of the same stratum (test fold): pair-weighted mean of fold AUCs.
    (R, n) scores and strata: the mean over the R repetitions."""
    aucs = []
    for s, st in zip(np.atleast_2d(score), np.atleast_2d(strata)):
        if len(y) == 0:
            return float("nan")
        wins, pairs = _pair_matrices(np.asarray(y), s, np.zeros(len(y), dtype=int), 1, st)
        aucs.append(wins.sum() / pairs.sum() if pairs.sum() else np.nan)
    return float(np.mean(aucs))


def _fold_of(folds: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    fold = np.full(n, -1)
    for i, (_, test) in enumerate(folds):
        fold[test] = i
    return fold


def _alone_raw(x: np.ndarray, y: np.ndarray, folds: list, n_splits: int, seed: int) -> dict:
    """The published way: the raw features alone (pooled z-scores, C = 1), on the grouped folds and on
    the leaky row split that puts rows of one target group on both sides."""
    out = {}
    row_folds = list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x))
    for name, splits in (("grouped", folds), ("row_split_leaky", row_folds)):
        score = np.zeros(len(y))
        for train, test in splits:
            scaler = _Standardizer().fit(x[train])
            if len(np.unique(y[train])) < 2:
                score[test] = float(y[train][0])
                continue
            score[test] = _fit(scaler.transform(x[train]), y[train], 1.0).decision_function(scaler.transform(x[test]))
        out[name] = stratified_auc(y, score, _fold_of(splits, len(y)))
    return out


def _cv_scores(layout: np.ndarray, feats: np.ndarray | None, shots: np.ndarray, y: np.ndarray,
               folds: list[tuple[np.ndarray, np.ndarray]], c: float) -> np.ndarray:
    """Out-of-fold decision scores with a fixed C (the bootstrap refits)."""
    score = np.zeros(len(y))
    for train, test in folds:
        if len(np.unique(y[train])) < 2:
            score[test] = float(y[train][0])
            continue
        x_tr, x_te = _design(layout, feats, shots, train, test)
        score[test] = _fit(x_tr, y[train], c).decision_function(x_te)
    return score


def refit_bootstrap(layout: np.ndarray, feats: dict[str, np.ndarray], shots: np.ndarray, y: np.ndarray,
                    groups: np.ndarray, cs: dict[str, float], n_splits: int, n_bootstrap: int = 200, seed: int = 0,
                    shot_values: tuple[int, ...] = ()) -> dict[str, dict]:
    """Bootstrap of the whole grouped cross-validation: resample target groups with replacement, rerun the
    folds (copies of a group stay in one fold) for the baseline and every feature set with the C chosen on
    the full data (``cs``: "baseline" and one per set), and collect the AUC gain overall and per shot.

    Refitting matters: holding the out-of-fold scores fixed and resampling only the evaluation ignores how
    much the fitted models themselves move with the sample, and gives intervals that are too narrow.
    Returns {set: {"all": gains, k: gains}} (arrays of length ``n_bootstrap``, NaN where undefined).
    """
    ids, group_ids = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(group_ids == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed + 7919)
    out = {name: {"all": np.full(n_bootstrap, np.nan), **{k: np.full(n_bootstrap, np.nan) for k in shot_values}}
           for name in feats}
    for b in range(n_bootstrap):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        yb, gb, sb = y[rows], group_ids[rows], shots[rows]
        if len(np.unique(yb)) < 2 or len(np.unique(gb)) < n_splits:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a class with fewer members than folds in a resample
            folds = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + b).split(rows, yb, gb))
        fold = _fold_of(folds, len(rows))
        base = _cv_scores(layout[rows], None, sb, yb, folds, cs["baseline"])
        for name, x in feats.items():
            feat = _cv_scores(layout[rows], x[rows], sb, yb, folds, cs[name])
            out[name]["all"][b] = stratified_auc(yb, feat, fold) - stratified_auc(yb, base, fold)
            for k in shot_values:
                m = sb == k
                out[name][k][b] = stratified_auc(yb[m], feat[m], fold[m]) - stratified_auc(yb[m], base[m], fold[m])
    return out


def _interval(gains: np.ndarray) -> dict:
    gains = gains[np.isfinite(gains)]
    if not len(gains):
        return {"ci_low": float("nan"), "ci_high": float("nan"), "p_gain_le_0": float("nan"), "bootstrap_valid": 0}
    low, high = percentile_interval(gains)
    return {"ci_low": low, "ci_high": high, "p_gain_le_0": float(np.mean(gains <= 0)), "bootstrap_valid": int(len(gains))}


def _importance(layout, feats, shots, y, c: float, cols: list[str], top: int = 10) -> tuple[dict, dict]:
    """|coefficient| of each feature in the layout + features model fitted on all rows (so importance is
    what a feature adds after the baseline), summed by (kind | zs / delta / dual | layer), and the top columns."""
    rows = np.arange(len(y))
    x, _ = _design(layout, feats, shots, rows, rows[:0])
    weights = np.abs(_fit(x, y, c).coef_[0][layout.shape[1]:])
    grouped: dict[str, float] = {}
    for name, w in zip(cols, weights):
        layer, _, kind, phase = _NAME.match(name).groups()
        key = f"{kind}|{phase or 'dual'}|L{layer}"
        grouped[key] = grouped.get(key, 0.0) + float(w)
    order = np.argsort(-weights)[:top]
    return (dict(sorted(grouped.items(), key=lambda kv: -kv[1])),
            {cols[i]: float(weights[i]) for i in order})


def _layout_matrix(data: pd.DataFrame, shot_values: list[int]) -> np.ndarray:
    onehot = [(data.few_shot_num.to_numpy() == k).astype(float) for k in shot_values]
    rest = [data[c].to_numpy(dtype=float) for c in LAYOUT[1:]]
    return np.column_stack(onehot + rest)


def analyse(features: pd.DataFrame, answers: pd.DataFrame, n_bootstrap: int = 200, seed: int = 0,
            n_splits: int = 5, n_repeats: int = 3, min_class_rows: int = 10,
            outcome_names: tuple[str, ...] = OUTCOMES, published_protocol: bool = False) -> dict:
    """Layout baseline, layout + features and the gain per outcome and feature set, overall and per shot.

    ``features``: one row per (image_id, few_shot_num) with the ``LAYOUT`` columns and feature columns
    (``features_table``); ``answers``: answer rows with hand labels (or parsed verdicts). Point estimates
    are means over ``n_repeats`` grouped cross-validations with other folds (seeds ``seed ..``), C chosen
    by inner grouped folds; intervals come from ``n_bootstrap`` refits on resampled target groups
    (``refit_bootstrap``). With ``published_protocol``, the published feature set also gets the reference
    notebook's classifier and split (``metagrad_protocol.published_protocol``), under that name.
    """
    missing = set(LAYOUT) - set(features.columns)
    if missing:
        raise ValueError(f"features table lacks layout columns {sorted(missing)}: rebuild it with features_table")
    unknown = set(outcome_names) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}: choose from {OUTCOMES}")
    data = outcomes(answers).merge(features, on=["image_id", "few_shot_num"], how="inner")
    unmatched = len(answers) - len(data)
    sets = feature_sets(features.columns)
    if not sets:
        raise ValueError("features table has no feature columns (L<layer>_H<head>_... or L<layer>_P_...)")
    groups = data.image_id.astype(str).to_numpy()
    shots = data.few_shot_num.to_numpy()
    shot_values = sorted(int(k) for k in np.unique(shots))
    layout = _layout_matrix(data, shot_values)
    xs = {name: data[cols].fillna(0.0).to_numpy(dtype=float) for name, cols in sets.items()}
    result = {"rows": int(len(data)), "answer_rows_without_features": int(unmatched),
              "groups": int(len(np.unique(groups))), "shots": {int(k): int((shots == k).sum()) for k in shot_values},
              "layout": list(LAYOUT), "feature_sets": {name: len(cols) for name, cols in sets.items()},
              "n_splits": n_splits, "n_repeats": n_repeats, "n_bootstrap": n_bootstrap, "seed": seed,
              "min_class_rows": min_class_rows, "outcome_columns": outcome_columns(answers), "outcomes": {}}
    for outcome in outcome_names:
        y = data[outcome].to_numpy()
        entry: dict = {"positive": int(y.sum()), "rows": int(len(y))}
        if len(np.unique(y)) < 2 or len(np.unique(groups)) < 2:
            entry["note"] = "a single outcome class or group: no AUC"
            result["outcomes"][outcome] = entry
            continue
        splits = min(n_splits, len(np.unique(groups)))
        repeats = [list(StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed + r).split(layout, y, groups))
                   for r in range(n_repeats)]
        fold = np.stack([_fold_of(folds, len(y)) for folds in repeats])
        base = np.stack([out_of_fold(layout, None, shots, y, groups, folds) for folds in repeats])
        everything = np.arange(len(y))
        cs = {"baseline": _choose_c(layout, None, shots, y, groups, everything)}
        cs.update({name: _choose_c(layout, x, shots, y, groups, everything) for name, x in xs.items()})
        entry["baseline"] = {"auc": stratified_auc(y, base, fold), "c": cs["baseline"]}
        enough = {}
        for k in shot_values:
            pos, neg = int(y[shots == k].sum()), int((1 - y[shots == k]).sum())
            enough[k] = min(pos, neg) >= min_class_rows
        boot = refit_bootstrap(layout, xs, shots, y, groups, cs, splits, n_bootstrap, seed,
                               tuple(k for k in shot_values if enough[k]))
        entry["sets"] = {}
        for name, cols in sets.items():
            x = xs[name]
            feat = np.stack([out_of_fold(layout, x, shots, y, groups, folds) for folds in repeats])
            report = {**paired_gain(y, base, feat, groups, fold, n_bootstrap=0, seed=seed), "c": cs[name],
                      **_interval(boot[name]["all"])}
            report["alone_raw"] = _alone_raw(x, y, repeats[0], splits, seed)
            within = {}
            for k in shot_values:
                rows = shots == k
                pos, neg = int(y[rows].sum()), int((1 - y[rows]).sum())
                if not enough[k]:
                    within[k] = {"rows": int(rows.sum()), "positive": pos,
                                 "note": f"{pos} positive / {neg} negative rows: fewer than {min_class_rows} of a class"}
                else:
                    within[k] = {**paired_gain(y[rows], base[:, rows], feat[:, rows], groups[rows], fold[:, rows],
                                               n_bootstrap=0, seed=seed), **_interval(boot[name][k])}
            report["within_shot"] = within
            report["importance"], report["top_features"] = _importance(layout, x, shots, y, cs[name], cols)
            if published_protocol and name == "published":
                from memefx.icl.metagrad_protocol import published_protocol as protocol

                report["published_protocol"] = protocol(x, y, shots, groups)
            entry["sets"][name] = report
        result["outcomes"][outcome] = entry
    return result
