"""The bootstrap pieces every interval of memefx shares (a leaf: numpy only).

memefx resamples units that repeat, never rows that share them: strata for miATE, anchors for stratum
MIDAS, target groups for the LLM analyses, seeds then strata for a study. Each caller draws its units with a
seeded ``numpy.random.default_rng``; these two helpers are the draw and the interval, so every interval is
the same percentile interval of the finite replicates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def percentile_interval(replicates, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of the finite replicates (NaN, NaN when there are none)."""
    values = np.asarray(replicates, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    return (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))


def bootstrap(statistic: Callable[[np.ndarray], float | None], n_units: int, n_bootstrap: int, seed: int
              ) -> np.ndarray:
    """Replicates of ``statistic(indices)`` over ``n_bootstrap`` resamples of ``n_units`` units with
    replacement (seeded); a resample whose statistic is undefined (None) gives NaN."""
    rng = np.random.default_rng(seed)
    out = np.full(n_bootstrap, np.nan)
    for b in range(n_bootstrap):
        value = statistic(rng.integers(0, n_units, n_units))
        if value is not None:
            out[b] = value
    return out
