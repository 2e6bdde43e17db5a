"""Held-out agreement of the answer parser with the published hand labels, rules chosen on other groups.

Every switch of ``memefx.icl.parse.Rules`` and the ``formatted`` threshold are chosen by cross-validation
with folds grouped by target group (``image_id``): the rule set with the best mean agreement over the five
fields on the training groups parses the held-out groups, and agreement is counted there only. Repeated
over several seeded fold assignments (5 folds) and once leave-one-group-out. Printed beside it: the rule
set chosen on every group (the parser's defaults), and trivial baselines (a constant answer per field;
the parser with every switch off).

    python benchmarks/parser_agreement.py [--answers ../shared/data/llm_answers.csv] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from memefx.icl.parse import FIELDS, SWITCHES, Rules, agreement_matrix, choose_rules, rule_grid

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_answers.csv"


def held_out(matrix: pd.DataFrame, groups: pd.Series, folds: list[np.ndarray]) -> tuple[dict[str, float], list[int]]:
    """Agreement per field over rows of held-out groups, each fold's rules chosen on the other groups."""
    hits = {f: np.zeros(len(matrix), dtype=int) for f in FIELDS}
    chosen = []
    for test_groups in folds:
        test = groups.isin(test_groups).to_numpy()
        index = choose_rules(matrix, ~test)
        chosen.append(index)
        for f in FIELDS:
            hits[f][test] = matrix[(index, f)].to_numpy()[test]
    return {f: float(hits[f].mean()) for f in FIELDS}, chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", default=str(DEFAULT), help="answer file with the is_* hand labels")
    parser.add_argument("--repeats", type=int, default=10, help="seeded 5-fold assignments")
    parser.add_argument("--folds", type=int, default=5)
    a = parser.parse_args(argv)
    if not Path(a.answers).is_file():
        print(f"answer file {a.answers} not found", file=sys.stderr)
        return 2
    raw = pd.read_csv(a.answers)
    answers = raw.drop_duplicates().reset_index(drop=True)
    groups = answers.image_id.astype(str)
    unique = np.array(sorted(groups.unique()))
    grid = rule_grid()
    matrix = agreement_matrix(answers, grid)
    print(f"rows={len(answers)} exact_duplicate_rows_dropped={len(raw) - len(answers)} groups={len(unique)} "
          f"rule_sets={len(grid)}")

    per_repeat = {f: [] for f in FIELDS}
    picks: Counter = Counter()
    for seed in range(a.repeats):
        shuffled = np.random.default_rng(seed).permutation(unique)
        scores, chosen = held_out(matrix, groups, [shuffled[k::a.folds] for k in range(a.folds)])
        for f in FIELDS:
            per_repeat[f].append(scores[f])
        picks.update(chosen)
    for f in FIELDS:
        print(f"heldout_{a.folds}fold_{f}_median={statistics.median(per_repeat[f]):.4f} "
              f"heldout_{a.folds}fold_{f}_min={min(per_repeat[f]):.4f}")
    logo, logo_chosen = held_out(matrix, groups, [np.array([g]) for g in unique])
    print(" ".join(f"heldout_logo_{f}={logo[f]:.4f}" for f in FIELDS))

    everything = choose_rules(matrix)
    print(" ".join(f"in_sample_{f}={matrix[(everything, f)].mean():.4f}" for f in FIELDS))
    print(f"chosen_on_all_groups={grid[everything]}")
    print(f"defaults_equal_choice={grid[everything] == Rules()}")
    folds_total = sum(picks.values()) + len(logo_chosen)
    for switch in SWITCHES:
        on = sum(n for i, n in picks.items() if getattr(grid[i], switch)) + sum(getattr(grid[i], switch) for i in logo_chosen)
        print(f"switch_{switch}_on_in_folds={on / folds_total:.3f}")
    openings = Counter(grid[i].opening for i in list(picks.elements()) + logo_chosen)
    print("opening_chosen_in_folds=" + ",".join(f"{k}:{v}" for k, v in sorted(openings.items())))

    off = next(i for i, r in enumerate(grid) if not any(getattr(r, s) for s in SWITCHES) and r.opening == 130)
    print(" ".join(f"baseline_all_switches_off_{f}={matrix[(off, f)].mean():.4f}" for f in FIELDS))
    constant = {f: max(answers[f"is_{f}"].mean(), 1 - answers[f"is_{f}"].mean()) for f in FIELDS}
    print(" ".join(f"baseline_majority_{f}={constant[f]:.4f}" for f in FIELDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
