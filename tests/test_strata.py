"""Strata against an independent pandas computation, on the real confounder table and synthetic data."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from memefx.cli import main
from memefx.data.strata import strata_members, stratum_lookup, summarize
from memefx.data.tables import read_confounders
from tests.conftest import shared_file


def _reference(path) -> dict:
    """Strata counted straight from the parquet file with plain pandas (no memefx code)."""
    raw = pd.read_parquet(path).drop_duplicates()
    out = {}
    for kind, col in (("shared_image", "img_org_id"), ("shared_text", "txt_org_id")):
        rows = raw[~raw[col].astype(str).isin(["No Confounder", "Not hit"])]
        g = rows.groupby(["split", col]).label.agg(size="size", pos=lambda s: (s == 1).sum(), neg=lambda s: (s == 0).sum())
        for split, part in g.groupby(level=0):
            strata = part[(part.pos > 0) & (part.neg > 0)]
            out.setdefault(split, {})[kind] = {
                "member_rows": int(part["size"].sum()), "groups": len(part), "strata": len(strata),
                "two_member_strata": int((strata["size"] == 2).sum()),
                "stratum_members": int(strata["size"].sum()),
                "size_histogram": {str(k): int(v) for k, v in strata["size"].value_counts().sort_index().items()},
            }
    return out


def test_strata_cli_on_real_table_matches_pandas(capsys):
    path = shared_file("confounders.parquet")
    with pytest.warns(UserWarning, match="removed 800 exact duplicate rows"):
        assert main(["strata", "--confounders", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _reference(path)


def test_strata_cli_one_split_and_table_output(capsys):
    path = shared_file("confounders.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["strata", "--confounders", str(path), "--split", "dev_seen", "--json"])
        got = json.loads(capsys.readouterr().out)
        assert list(got) == ["dev_seen"] and got["dev_seen"] == _reference(path)["dev_seen"]
        main(["strata", "--confounders", str(path), "--split", "dev_seen"])
    text = capsys.readouterr().out
    assert "shared_image" in text and str(got["dev_seen"]["shared_text"]["strata"]) in text


def test_groups_larger_than_two_are_kept_and_pairs_only_filters(tiny_root):
    conf = read_confounders(tiny_root / "confounders.parquet")
    members = strata_members(conf)
    sizes = members.drop_duplicates(["split", "kind", "anchor"])["size"]
    assert (sizes > 2).any() and (sizes == 2).any()
    pairs = strata_members(conf, pairs_only=True)
    assert set(pairs["size"]) == {2}
    assert pairs.drop_duplicates(["split", "kind", "anchor"]).shape[0] == (sizes == 2).sum()


def test_lookup_assigns_every_member_one_stratum_per_kind(tiny_root):
    conf = read_confounders(tiny_root / "confounders.parquet")
    lookup = stratum_lookup(conf, "train")
    summary = summarize(conf, "train")["train"]
    for kind in ("shared_image", "shared_text"):
        assert len(set(lookup[kind].values())) == summary[kind]["strata"]
        assert len(lookup[kind]) == summary[kind]["stratum_members"]
