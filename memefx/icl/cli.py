"""``memefx icl parse|table``: answer parsing and the per-shot table (the engine subcommands are open work)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def _read(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"memefx icl: {p} not found")
    return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)


def main(argv: list[str]) -> int:
    from memefx.icl.metrics import shot_table
    from memefx.icl.parse import parse_table

    p = argparse.ArgumentParser(prog="memefx icl")
    sub = p.add_subparsers(dest="command", required=True)
    parse = sub.add_parser("parse", help="free-form answers -> parsed_is_* verdict columns")
    parse.add_argument("--answers", required=True)
    parse.add_argument("--out", required=True, help=".csv or .parquet")
    parse.add_argument("--column", default=None, help="answer text column (default extracted_info)")
    table = sub.add_parser("table", help="accuracy and ATE per shot count")
    table.add_argument("--answers", required=True)
    table.add_argument("--parsed", action="store_true", help="score the parsed_is_* columns (parsing first if absent)")
    table.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    answers = _read(a.answers)
    if a.command == "parse":
        out = parse_table(answers, a.column)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        out.to_parquet(a.out, index=False) if a.out.endswith(".parquet") else out.to_csv(a.out, index=False)
        hand = [c for c in ("is_functional", "is_formatted", "is_hateful") if c in answers]
        agreement = {c: round(float((out[c] == out[f"parsed_{c}"]).mean()), 4) for c in hand}
        print(json.dumps({"rows": len(out), "parsed_functional": int(out.parsed_is_functional.sum()),
                          "agreement_with_hand_labels": agreement}))
        return 0
    if a.parsed and "parsed_is_functional" not in answers:
        answers = parse_table(answers)
    result = shot_table(answers, parsed=a.parsed)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for shot, r in result.items():
            h = r["is_hateful"]["all"]
            print(f"{shot:>16}  n={r['n']:4d}  acc(is_hateful)={h['accuracy']:.3f}  ATE={h['ate']:.3f}")
    return 0
