"""A run's per-prompt answers -> one row per (prompt, pair), the layout of the published answer file.

``memefx icl run`` writes one row per prompt, carrying the prompt table's columns: ``group`` (target group),
``few_shot_num``, ``prompt``, ``member_ids`` and ``member_labels`` (pair #0, #1, ... of the target block, in
the prompt's order) and the model's ``generated_text``. The parser and the per-shot table work on pairs:
``image_id`` (the group), ``few_shot_num``, ``ans_num`` (the pair's number as the prompt writes it, #0 first,
as in the published file), ``ground_truth`` (the member's gold label), ``id`` (the member meme), the answer.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from memefx.icl.engine import UserError
from memefx.icl.grammar import pairs_in_prompt

REQUIRED = ("group", "few_shot_num", "prompt", "member_ids", "generated_text")
LIST_COLUMNS = ("member_ids", "member_labels", "gold_labels")


def _as_list(value: object, column: str, where: str) -> list:
    """A list cell as written by parquet (array), pandas (list) or CSV (a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: {column} {value[:60]!r} is not a JSON list") from err
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise UserError(f"{where}: {column} is {type(value).__name__} {value!r}, expected a list")
    return list(value)


def is_run_output(table: pd.DataFrame) -> bool:
    """True for a run's per-prompt table (member lists, no per-pair ``ans_num``)."""
    return "ans_num" not in table and "member_ids" in table


def expand_answers(run_output: pd.DataFrame, text_column: str = "generated_text") -> pd.DataFrame:
    """One row per (prompt, pair) with ``image_id, few_shot_num, ans_num, ground_truth, id`` and the answer.

    Labels come from ``member_labels`` (or ``gold_labels``, the older name). Every prompt must list as many
    members as its target block has ``#k:`` member lines (the header's "#0 to #N" is not trusted: the
    published procedure inflates it when a meme text holds '#'); a mismatch is an error naming the row,
    never a guess. A prompt with no pair of its own (a published-layout target whose every member line is
    listed under another group: header "#0 to #-1", no member ids) gives no row; such prompts are counted,
    warned about and listed in ``table.attrs["no_pairs"]`` ("group G, k-shot"), never dropped silently."""
    label_column = "member_labels" if "member_labels" in run_output else "gold_labels"
    missing = [c for c in (*REQUIRED[:-1], text_column) if c not in run_output]
    if label_column not in run_output:
        missing.append("member_labels")
    if missing:
        hint = (" (a --mode score run gives p_hateful per prompt: read it as predictions, not through parse)"
                if text_column in missing and "p_hateful" in run_output else "")
        raise UserError(f"run output lacks columns {missing} (has {list(run_output.columns)}){hint}")
    carried = [c for c in run_output.columns if c not in (*LIST_COLUMNS, "group", "few_shot_num")]
    rows, no_pairs = [], []
    for number, (_, row) in enumerate(run_output.iterrows()):
        where = f"run output row {number} (group {row['group']!r}, {row['few_shot_num']}-shot)"
        ids = [str(i) for i in _as_list(row["member_ids"], "member_ids", where)]
        labels = _as_list(row[label_column], label_column, where)
        pairs = pairs_in_prompt(row["prompt"])
        if len(ids) != len(labels) or (pairs is not None and pairs != len(ids)):
            raise UserError(f"{where}: {len(ids)} member ids, {len(labels)} labels, {pairs} member lines in the "
                            "prompt's target block: they must agree (rebuild the prompts with memefx icl prompts)")
        if not ids:
            no_pairs.append(f"group {row['group']}, {row['few_shot_num']}-shot")
        for k, (meme, label) in enumerate(zip(ids, labels)):
            rows.append({"image_id": str(row["group"]), "few_shot_num": int(row["few_shot_num"]), "ans_num": k,
                         "ground_truth": int(label), "id": meme, **{c: row[c] for c in carried}})
    columns = ["image_id", "few_shot_num", "ans_num", "ground_truth", "id", *carried]
    table = pd.DataFrame(rows, columns=columns)
    if no_pairs:
        warnings.warn(no_pairs_message(no_pairs), stacklevel=2)
    table.attrs["no_pairs"] = no_pairs
    return table


def no_pairs_message(no_pairs: Sequence[str]) -> str:
    """The one-line report of prompts left out of the per-pair table because their target has no pair."""
    shown = "; ".join(no_pairs[:5]) + ("; ..." if len(no_pairs) > 5 else "")
    return (f"{len(no_pairs)} prompt(s) have no pair of their own and give no answer row ({shown}): their target "
            "group's member lines are all listed under other groups (published layout, header '#0 to #-1')")
