"""Confounder strata (SPEC section 1): groups that share a picture or a text and hold both labels.

``shared_image`` groups (same ``img_org_id``) vary the text, which is then the treatment;
``shared_text`` groups (same ``txt_org_id``) vary the image. Groups of any size are kept; the reference
code's restriction to two-member groups is the ``pairs_only`` option.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from memefx.schema import KIND_COLUMN, KINDS  # noqa: F401  (re-exported)


def group_members(confounders: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, kind, anchor, member) with the group's size and label counts.

    Columns: split, kind, anchor, id, label, size, n_hateful, n_benign, is_stratum.
    """
    parts = []
    for kind, column in KIND_COLUMN.items():
        grouped = confounders[confounders[column].notna()][["split", column, "id", "label"]]
        grouped = grouped.rename(columns={column: "anchor"}).assign(kind=kind)
        parts.append(grouped)
    members = pd.concat(parts, ignore_index=True)
    keys = ["split", "kind", "anchor"]
    members["size"] = members.groupby(keys).id.transform("size")
    members["n_hateful"] = members.groupby(keys).label.transform(lambda s: int((s == 1).sum()))
    members["n_benign"] = members.groupby(keys).label.transform(lambda s: int((s == 0).sum()))
    members["is_stratum"] = (members.n_hateful > 0) & (members.n_benign > 0)
    return members[["split", "kind", "anchor", "id", "label", "size", "n_hateful", "n_benign", "is_stratum"]]


def strata_members(confounders: pd.DataFrame, pairs_only: bool = False) -> pd.DataFrame:
    """Members of strata only (groups with a hateful and a benign member), optionally two-member only.

    Adds ``stratum``: an integer id per (split, kind, anchor), stable for a given table.
    """
    members = group_members(confounders)
    members = members[members.is_stratum]
    if pairs_only:
        members = members[members["size"] == 2]
    members = members.copy()
    members = members.sort_values(["split", "kind", "anchor", "id"]).reset_index(drop=True)
    members["stratum"] = members.groupby(["split", "kind", "anchor"], sort=False).ngroup()
    return members


def summarize(confounders: pd.DataFrame, split: str | None = None) -> dict:
    """Per split and kind: member rows, groups, strata with both labels, two-member strata, size histogram."""
    members = group_members(confounders)
    if split is not None:
        members = members[members.split == split]
    out: dict = {}
    for (sp, kind), rows in members.groupby(["split", "kind"], sort=True):
        groups = rows.drop_duplicates("anchor")
        strata = groups[groups.is_stratum]
        out.setdefault(sp, {})[kind] = {
            "member_rows": int(len(rows)),
            "groups": int(len(groups)),
            "strata": int(len(strata)),
            "two_member_strata": int((strata["size"] == 2).sum()),
            "stratum_members": int(strata["size"].sum()),
            "size_histogram": {str(k): v for k, v in sorted(Counter(strata["size"].tolist()).items())},
        }
    return out


def stratum_lookup(confounders: pd.DataFrame, split: str, pairs_only: bool = False) -> dict[str, dict[str, int]]:
    """For one split: kind -> {meme id -> stratum id}; memes outside any stratum are absent."""
    members = strata_members(confounders, pairs_only)
    members = members[members.split == split]
    return {kind: dict(zip(rows.id, rows.stratum)) for kind, rows in members.groupby("kind")} | {
        kind: {} for kind in KINDS if kind not in set(members.kind)
    }
