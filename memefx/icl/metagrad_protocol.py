"""The reference notebook's classifier and split (``hf_llama2.ipynb``, "explain by attention weights"),
reported beside memefx's grouped analysis, never instead of it.

As the notebook did it: answer rows of shot counts 0-2 only; ``train_test_split(X, y, test_size=0.3,
random_state=1991)``, then the training part split again 80/20 into train and validation with the same
seed; ``optuna.integration.lightgbm.LightGBMTuner`` (binary log-loss, learning rate 0.1, seed 1991,
deterministic, row-wise; up to 500 rounds, early stopping after 5 on the validation set; ``optuna_seed``
1991) tunes LightGBM step by step on the validation set; the AUC of the best booster on the test rows is the
published figure (0.861 for ``is_functional``). The row split puts answer rows of one target group, which
share their features, on both sides. memefx reports the same classifier on a split by target group beside it
(``GroupShuffleSplit`` with the same proportions and seed).

LightGBM and Optuna are the optional extra ``memefx[lightgbm]``, imported only here.
"""

from __future__ import annotations

import numpy as np

from memefx.icl.engine import UserError

SEED = 1991
SCOPE_SHOTS = (0, 1, 2)
EXTRA = "pip install 'memefx[lightgbm]'"


class MissingExtraError(UserError, ImportError):
    """The published classifier needs an optional extra that is not installed (the CLI exits 2 on it)."""


def require_lightgbm():
    """``(lightgbm, LightGBMTuner)``, or an error that names the extra to install."""
    try:
        import lightgbm
        import optuna
    except ImportError as err:
        raise MissingExtraError(f"the published classifier (LightGBM tuned by Optuna) needs {err.name}: {EXTRA} "
                                "(lightgbm, optuna, optuna-integration), or skip it with --published_protocol false") from err
    try:
        from optuna_integration.lightgbm import LightGBMTuner
    except ImportError:
        try:  # optuna < 4 shipped the tuner itself
            from optuna.integration.lightgbm import LightGBMTuner
        except ImportError as err:
            raise MissingExtraError(f"the published classifier needs optuna-integration: {EXTRA}, or skip it with "
                                    "--published_protocol false") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return lightgbm, LightGBMTuner


def lightgbm_params(seed: int = SEED) -> dict:
    """The notebook's fixed LightGBM parameters (the tuner searches the others)."""
    return {"verbose": -1, "task": "train", "boosting_type": "gbdt", "objective": "binary",
            "metric": "binary_logloss", "learning_rate": 0.1, "seed": seed, "deterministic": True,
            "force_row_wise": True}


def row_split(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The notebook's split of ``n`` rows (train, validation, test indices): 30% test, then 20% of the rest
    for validation, both ``train_test_split`` with ``random_state=seed``."""
    from sklearn.model_selection import train_test_split

    train_valid, test = train_test_split(np.arange(n), random_state=seed, test_size=0.3)
    train, valid = train_test_split(train_valid, random_state=seed, test_size=0.2)
    return train, valid, test


def grouped_split(groups: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same proportions with whole target groups on one side (``GroupShuffleSplit``)."""
    from sklearn.model_selection import GroupShuffleSplit

    train_valid, test = next(GroupShuffleSplit(1, test_size=0.3, random_state=seed).split(groups, groups=groups))
    inner = GroupShuffleSplit(1, test_size=0.2, random_state=seed).split(train_valid, groups=groups[train_valid])
    train, valid = next(inner)
    return train_valid[train], train_valid[valid], test


def tuned_booster(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
                  seed: int = SEED):
    """``LightGBMTuner`` as the notebook ran it; returns the best booster."""
    lgb, LightGBMTuner = require_lightgbm()
    train = lgb.Dataset(x_train, y_train)
    valid = lgb.Dataset(x_valid, y_valid, reference=train)
    tuner = LightGBMTuner(lightgbm_params(seed), train, num_boost_round=500, valid_sets=[train, valid],
                          valid_names=["Train", "Valid"], callbacks=[lgb.early_stopping(5, verbose=False)],
                          optuna_seed=seed, show_progress_bar=False)
    tuner.run()
    return tuner.get_best_booster()


def _fit_and_score(x: np.ndarray, y: np.ndarray, split: tuple[np.ndarray, ...], seed: int) -> dict:
    from sklearn.metrics import roc_auc_score

    train, valid, test = split
    out = {"train": int(len(train)), "valid": int(len(valid)), "test": int(len(test)),
           "test_positive": int(y[test].sum())}
    if min(len(np.unique(y[train])), len(np.unique(y[valid])), len(np.unique(y[test]))) < 2:
        return {**out, "auc": float("nan"), "note": "a single outcome class in the train, validation or test rows"}
    booster = tuned_booster(x[train], y[train], x[valid], y[valid], seed)
    params = {k: v for k, v in booster.params.items() if k not in lightgbm_params(seed)}
    return {**out, "auc": float(roc_auc_score(y[test], booster.predict(x[test]))), "params": params,
            "best_iteration": int(booster.best_iteration)}


def published_protocol(x: np.ndarray, y: np.ndarray, shots: np.ndarray, groups: np.ndarray,
                       seed: int = SEED) -> dict:
    """The notebook's classifier on its row split, and on a split by target group, over the answer rows of
    shot counts 0-2 (rows in the answer table's order, as the notebook's split depends on it)."""
    scope = np.isin(shots, SCOPE_SHOTS)
    x, y, groups = x[scope], np.asarray(y)[scope].astype(int), np.asarray(groups)[scope]
    out = {"classifier": "LightGBM tuned by optuna LightGBMTuner", "seed": seed, "scope_shots": list(SCOPE_SHOTS),
           "rows": int(len(y)), "positive": int(y.sum())}
    if len(np.unique(groups)) < 4 or len(y) < 10:
        return {**out, "note": "fewer than 4 target groups or 10 rows in scope: no split"}
    out["row_split"] = _fit_and_score(x, y, row_split(len(y), seed), seed)
    out["grouped_split"] = _fit_and_score(x, y, grouped_split(groups, seed), seed)
    return out
