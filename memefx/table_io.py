"""One reader for the tables users hand memefx (predictions, prompt tables, LLM answers): CSV or TSV (the
delimiter sniffed: comma, tab or semicolon), JSON (lines or an array of records, told apart by the content)
or parquet. Errors name the file and say what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from memefx.errors import UserError

SUFFIXES = (".parquet", ".csv", ".tsv", ".txt", ".json", ".jsonl")


def read_table(path: str | Path, text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """The table in ``path``; ``text_columns`` are read as text (ids keep their leading zeros)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown format {suffix!r}: use .csv, .tsv, .txt, .json, .jsonl or .parquet")
    dtype = {c: str for c in text_columns}
    if suffix != ".parquet" and not path.read_bytes().strip():
        raise UserError(f"{path} is empty (no header, no rows)")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return _read_delimited(path, dtype)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty (no header, no rows)") from None
    except Exception as err:  # noqa: BLE001 - every reader fails differently; name the file
        raise UserError(f"{path}: cannot be read as a {suffix[1:]} table ({type(err).__name__}: {err}); "
                        "expected one row per line with a header line") from None
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    lines = not head.startswith(b"[")  # a JSON array of records opens with '[', JSON lines with '{'
    try:
        return pd.read_json(path, lines=lines, dtype=dtype)
    except ValueError as err:
        form = "JSON lines (one object a line)" if lines else "a JSON array of records"
        raise UserError(f"{path}: neither JSON lines nor a JSON array of records: read as {form}, {err}") from None


def _read_delimited(path: Path, dtype: dict) -> pd.DataFrame:
    """The delimiter is read off the header line alone (comma, tab or semicolon; a one-column header: comma),
    so prose in quoted fields below cannot mislead the sniffing."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = f.readline()
    try:
        delimiter = csv.Sniffer().sniff(header, delimiters=",\t;").delimiter
    except csv.Error:
        delimiter = ","
    return pd.read_csv(path, sep=delimiter, dtype=dtype)
