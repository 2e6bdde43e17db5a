"""miATE known answers (SPEC section 2), a plain pandas reference, bad input, and DDP equality."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memefx.causal.miate import miate, miate_from_predictions, stratum_effects, summarize
from memefx.causal.miate_metric import MiATE
from memefx.data.strata import strata_members
from memefx.data.synthetic import SyntheticConfig, generate_memes, truth_table
from tests.conftest import free_port


def _world(cfg: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    truth = truth_table(generate_memes(cfg))
    conf = truth[["id", "split", "label", "img_org_id", "txt_org_id"]].replace({"No Confounder": None})
    return truth, strata_members(conf)


def _rows(truth, members, split, kind, p) -> pd.DataFrame:
    chosen = members[(members.split == split) & (members.kind == kind)]
    return chosen[["id", "stratum", "label"]].merge(truth[["id"]].assign(p=p), on="id")


@pytest.fixture(scope="module")
def world():
    return _world(SyntheticConfig(n_memes=6000, seed=11, label_noise=0.1, split_fractions=(0.4, 0.3, 0.3)))


def test_bayes_optimal_predictor_gives_one_minus_two_eps(world):
    truth, members = world
    eps = 0.1
    p = np.where(truth.text_attr & truth.image_attr, 1 - eps, eps)
    for kind in ("shared_image", "shared_text"):
        result = miate(_rows(truth, members, "dev_seen", kind, p), n_bootstrap=200)
        assert result["n_strata"] > 100
        assert result["mean"] == pytest.approx(1 - 2 * eps, abs=1e-12)
        assert result["ci_low"] - 1e-12 <= 1 - 2 * eps <= result["ci_high"] + 1e-12
        assert abs(result["placebo"]["mean"]) < 0.05


def test_unimodal_predictors_give_exactly_zero_on_their_strata(world):
    truth, members = world
    text_only = truth.text.map(lambda t: (hash(t) % 997) / 997.0).to_numpy()
    image_only = (truth.image_crc % 991 / 991.0).to_numpy()
    assert miate(_rows(truth, members, "dev_seen", "shared_text", text_only))["mean"] == 0.0
    assert miate(_rows(truth, members, "dev_seen", "shared_image", image_only))["mean"] == 0.0
    # ...while the other kind sees the varying modality
    assert miate(_rows(truth, members, "dev_seen", "shared_image", text_only))["mean"] != 0.0


def test_noisy_evaluation_labels_shrink_pairs_as_derived():
    eps = 0.2
    truth, members = _world(SyntheticConfig(n_memes=40_000, seed=5, label_noise=eps, eval_label_noise=eps,
                                            max_confounders=1, split_fractions=(0.1, 0.8, 0.1)))
    p = np.where(truth.text_attr & truth.image_attr, 1 - eps, eps)
    result = miate(_rows(truth, members, "dev_seen", "shared_image", p), pairs_only=True, n_bootstrap=0)
    expected = (1 - 2 * eps) ** 2 / (1 - 2 * eps + 2 * eps**2)
    assert abs(result["mean"] - expected) < 4 * result["se"], (result["mean"], expected)


def test_bootstrap_interval_covers_a_planted_effect():
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(200):
        n = 40
        pos = rng.normal(0.7, 0.15, n)
        neg = rng.normal(0.3, 0.15, n)
        rows = pd.DataFrame({"stratum": np.repeat(np.arange(n), 2), "label": np.tile([1, 0], n),
                             "p": np.column_stack([pos, neg]).ravel()})
        effects, _ = stratum_effects(rows)
        s = summarize(effects, n_bootstrap=400, seed=rep)
        covered += s["ci_low"] <= 0.4 <= s["ci_high"]
    assert 0.88 <= covered / 200 <= 0.99, covered


def _reference(rows: pd.DataFrame) -> tuple[float, float]:
    """Plain pandas: per-stratum difference of class means; unweighted and member-weighted means."""
    per = rows.pivot_table(index="stratum", columns="label", values="p", aggfunc="mean").dropna()
    diff = per[1] - per[0]
    sizes = rows.groupby("stratum").size().loc[diff.index]
    return diff.mean(), (diff * sizes).sum() / sizes.sum()


def _random_rows(seed=0, n_strata=60):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 5, n_strata)
    stratum = np.repeat(np.arange(n_strata), sizes)
    label = np.concatenate([rng.permutation([1, 0] + list(rng.integers(0, 2, s - 2))) for s in sizes])
    return pd.DataFrame({"id": np.arange(len(stratum)) * 7 + 1, "stratum": stratum, "label": label,
                         "p": rng.random(len(stratum))})


def test_metric_equals_pandas_reference_batch_by_batch_and_at_once():
    rows = _random_rows()
    ref_mean, ref_weighted = _reference(rows)
    once = MiATE(n_bootstrap=100)
    once.update(*(torch.tensor(rows[c].to_numpy()) for c in ("p", "label", "stratum", "id")))
    batched = MiATE(n_bootstrap=100)
    shuffled = rows.sample(frac=1, random_state=1)
    for idx in np.array_split(np.arange(len(shuffled)), 7):
        chunk = shuffled.iloc[idx]
        batched.update(*(torch.tensor(chunk[c].to_numpy()) for c in ("p", "label", "stratum", "id")))
    for metric in (once, batched):
        out = metric.compute()
        assert out["mean"] == pytest.approx(ref_mean, abs=1e-12)
        assert out["weighted_mean"] == pytest.approx(ref_weighted, abs=1e-12)
    assert once.compute()["ci_low"] == batched.compute()["ci_low"]  # seeded, order-independent


def test_rows_outside_strata_are_ignored_and_duplicates_counted_once():
    rows = _random_rows(1, 10)
    metric = MiATE(n_bootstrap=0)
    t = {c: torch.tensor(rows[c].to_numpy()) for c in ("p", "label", "stratum", "id")}
    metric.update(t["p"], t["label"], t["stratum"], t["id"])
    metric.update(t["p"][:3], t["label"][:3], t["stratum"][:3], t["id"][:3])  # DDP padding repeats rows
    metric.update(torch.tensor([0.9]), torch.tensor([1]), torch.tensor([-1]), torch.tensor([99999]))
    assert metric.compute()["mean"] == pytest.approx(_reference(rows)[0], abs=1e-12)


def test_options_are_recorded_and_threshold_selects_on_the_outcome():
    rows = _random_rows(2)
    plain = miate(rows, n_bootstrap=0)
    cut = miate(rows, n_bootstrap=0, threshold=0.0)
    assert cut["options"]["threshold"] == 0.0 and plain["options"]["threshold"] is None
    assert cut["mean"] > plain["mean"]  # the reference runs' tau = 0 biases upward
    assert cut["skipped"]["deselected_strata"] == plain["n_strata"] - cut["n_strata"]
    curve = {c["tau"]: c for c in plain["threshold_curve"]}
    assert curve[-1.0]["n_strata"] == plain["n_strata"] and curve[0.0]["mean"] == pytest.approx(cut["mean"])
    pairs = miate(rows, n_bootstrap=0, pairs_only=True)
    assert {r["size"] for r in pairs["strata"]} == {2}
    correct = miate(rows, n_bootstrap=0, correct_only=True)
    assert all(r["all_correct"] for r in correct["strata"])


def test_bad_input_is_reported():
    rows = _random_rows(3, 5)
    with pytest.raises(ValueError, match=r"NaN probabilities \(meme ids \[1\]\)"):
        MiATE().update(torch.tensor([float("nan")]), torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))
    one_label = pd.concat([rows, pd.DataFrame({"id": [900, 901], "stratum": [99, 99], "label": [1, 1], "p": [0.5, 0.6]})])
    one_label = pd.concat([one_label, pd.DataFrame({"id": [902], "stratum": [98], "label": [-1], "p": [0.5]})])
    result = miate(one_label, n_bootstrap=0)
    assert result["skipped"]["one_label_strata"] == 1 and result["skipped"]["unlabeled_members"] == 1
    assert result["n_strata"] == 5


def test_predictions_missing_for_stratum_members_are_an_error(world):
    truth, members = world
    preds = truth[truth.split == "dev_seen"][["id", "label"]].assign(p_hateful=0.5)
    ok = miate_from_predictions(preds, members, "shared_image", "dev_seen", n_bootstrap=0)
    assert ok["mean"] == 0.0
    dropped = preds.iloc[1:]
    missing = members[(members.split == "dev_seen") & (members.kind == "shared_image")].id
    if preds.id.iloc[0] in set(missing):
        with pytest.raises(ValueError, match=r"1 shared_image stratum members of 'dev_seen' have no prediction"):
            miate_from_predictions(dropped, members, "shared_image", "dev_seen")
    with pytest.raises(ValueError, match="disagree with the confounder table"):
        miate_from_predictions(preds.assign(label=1 - preds.label), members, "shared_image", "dev_seen")


def _ddp_worker(rank: int, world_size: int, rows: pd.DataFrame, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = MiATE(n_bootstrap=100)
        part = rows.iloc[rank::world_size]
        metric.update(*(torch.tensor(part[c].to_numpy()) for c in ("p", "label", "stratum", "id")))
        result = metric.compute()
        if rank == 0:
            out.update({k: result[k] for k in ("mean", "weighted_mean", "ci_low", "ci_high", "n_strata")})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns processes
def test_two_gloo_processes_equal_one_process():
    rows = _random_rows(4)
    single = MiATE(n_bootstrap=100)
    single.update(*(torch.tensor(rows[c].to_numpy()) for c in ("p", "label", "stratum", "id")))
    expected = single.compute()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, rows, free_port(), out), nprocs=2, join=True)
        got = dict(out)
    for key in ("mean", "weighted_mean", "ci_low", "ci_high", "n_strata"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12) or (math.isnan(got[key]) and math.isnan(expected[key]))
