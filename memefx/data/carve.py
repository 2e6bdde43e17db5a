"""A validation split carved from the training split, whole confounder groups at a time.

Choosing a checkpoint or an option on dev_seen and then reporting dev_seen figures selects on the reported
data; dev_unseen shares most of its memes with dev_seen. So selection gets its own memes, taken from train.
Memes linked by a confounder anchor (same picture, or same text) stay on one side: the groups are the
connected components of the meme-anchor graph over both kinds, so no stratum of either kind straddles
the cut. The draw is sklearn's ``GroupShuffleSplit`` over those components, seeded.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import GroupShuffleSplit

from memefx.schema import KIND_COLUMN


def anchor_components(ids: pd.Series, confounders: pd.DataFrame | None, split: str) -> np.ndarray:
    """Component label per meme: memes sharing a shared-image or shared-text anchor (directly or through a
    chain of such links) share a label; a meme in no group is its own component."""
    ids = ids.astype(str).reset_index(drop=True)
    position = {meme: k for k, meme in enumerate(ids)}
    rows, cols = [], []
    if confounders is not None:
        table = confounders[(confounders.split == split) & confounders.id.isin(position)]
        anchors: dict[tuple[str, str], int] = {}
        for kind, column in KIND_COLUMN.items():
            for meme, anchor in zip(table.id, table[column]):
                if anchor is None or (isinstance(anchor, float) and np.isnan(anchor)):
                    continue
                node = anchors.setdefault((kind, str(anchor)), len(ids) + len(anchors))
                rows.append(position[meme])
                cols.append(node)
        size = len(ids) + len(anchors)
    else:
        size = len(ids)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    return labels[: len(ids)]


def carve_validation(ids: pd.Series, confounders: pd.DataFrame | None, split: str, fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, dict]:
    """Boolean mask of the memes (in ``ids`` order) that form the validation split, and its record
    (fraction, seed, counts, a digest of the chosen ids) for provenance."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_from_train={fraction!r}: expected a fraction of the training split in (0, 1), "
                         "e.g. 0.1")
    groups = anchor_components(ids, confounders, split)
    if len(np.unique(groups)) < 2:
        raise ValueError(f"data.val_from_train: the training split {split!r} forms a single confounder group; "
                         "nothing can be held out whole")
    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(groups)), groups=groups))
    mask = np.zeros(len(groups), dtype=bool)
    mask[held] = True
    chosen = sorted(ids.astype(str)[mask])
    record = {"fraction": float(fraction), "seed": int(seed), "memes": int(mask.sum()), "of": int(len(mask)),
              "groups": int(len(np.unique(groups[mask]))), "of_groups": int(len(np.unique(groups))),
              "ids_sha256": hashlib.sha256(",".join(chosen).encode()).hexdigest(),
              "grouped_by": "confounder anchors (both kinds)" if confounders is not None else "meme (no confounder table)"}
    return mask, record
