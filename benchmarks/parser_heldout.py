"""The answer parser against the published hand labels, on target groups never read while writing its rules.

The labelled answers (``llm_answers.csv``, exact duplicate rows dropped) are split by target group with
``memefx.icl.parse.is_held_out``: a hash of the group id, fixed before any rule was chosen. Development part:
the rules were written looking at its answers only, and ``choose_rules`` picks the switches and the
``formatted`` threshold on it (they are the defaults of ``Rules``). Held-out part: scored, never read.

Without ``--held-out`` the script touches the development part only (what rule writing may look at); with
it, it prints the held-out agreement per field, the figure the README reports. Also printed: how far the hand
labels agree with themselves (rows the parser cannot tell apart, i.e. the same reply, target-block size and
pair, labelled differently) and the ceiling that sets; trivial baselines on the same rows.

    python benchmarks/parser_heldout.py [--answers ../shared/data/llm_answers.csv]              # development
    python benchmarks/parser_heldout.py --held-out [--answers ../shared/data/llm_answers.csv]   # + held-out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from memefx.icl.parse import (
    FIELDS,
    SWITCHES,
    Rules,
    agreement_matrix,
    choose_rules,
    label_ceiling,
    parse_table,
    parser_inputs,
    rule_grid,
    split_labelled,
)

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_answers.csv"


def agreement(rows: pd.DataFrame, rules: Rules) -> dict[str, float]:
    """Share of rows whose parsed value equals the hand label, per field."""
    parsed = parse_table(rows, rules=rules)
    return {f: float((parsed[f"is_{f}"].astype(int) == parsed[f"parsed_is_{f}"]).mean()) for f in FIELDS}


def line(prefix: str, values: dict[str, float]) -> str:
    return " ".join(f"{prefix}_{f}={values[f]:.4f}" for f in FIELDS)


def consistency(name: str, rows: pd.DataFrame) -> None:
    """Hand labels of identical answers: same generated text and pair; and same parser input."""
    same_text = label_ceiling(rows, rows[["generated_text", "ans_num"]])
    same_input = label_ceiling(rows, parser_inputs(rows))
    print(" ".join(f"{name}_same_text_and_pair_disagreeing_{f}={same_text[f][0]}" for f in FIELDS))
    print(" ".join(f"{name}_same_parser_input_disagreeing_{f}={same_input[f][0]}" for f in FIELDS))
    print(" ".join(f"{name}_ceiling_{f}={same_input[f][1]:.4f}" for f in FIELDS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", default=str(DEFAULT), help="answer file with the is_* hand labels")
    parser.add_argument("--held-out", action="store_true", help="also score the held-out groups")
    a = parser.parse_args(argv)
    if not Path(a.answers).is_file():
        print(f"answer file {a.answers} not found", file=sys.stderr)
        return 2
    raw = pd.read_csv(a.answers)
    answers = raw.drop_duplicates().reset_index(drop=True)
    development, held_out = split_labelled(answers)
    print(f"rows={len(answers)} exact_duplicate_rows_dropped={len(raw) - len(answers)} "
          f"development_groups={development.image_id.nunique()} development_rows={len(development)} "
          f"held_out_groups={held_out.image_id.nunique()} held_out_rows={len(held_out)}")

    grid = rule_grid()
    matrix = agreement_matrix(development, grid)
    chosen = grid[choose_rules(matrix)]
    print(f"chosen_on_development={chosen}")
    print(f"defaults_equal_choice={chosen == Rules()}")
    print(line("development_in_sample", agreement(development, Rules())))
    consistency("development", development)
    if not a.held_out:
        return 0

    print(line("held_out", agreement(held_out, Rules())))
    off = Rules(**{s: False for s in SWITCHES})
    print(line("held_out_baseline_all_switches_off", agreement(held_out, off)))
    majority = {f: int(development[f"is_{f}"].mean() >= 0.5) for f in FIELDS}  # the development's majority value
    print(line("held_out_baseline_constant", {f: float((held_out[f"is_{f}"] == majority[f]).mean()) for f in FIELDS}))
    consistency("held_out", held_out)
    consistency("all", answers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
