"""The published pair-selection prompt set, two ways (SPEC section 5).

**Procedure** (``published_prompt_table``): the authors' prompt-extraction procedure, step by step, so that
it rebuilds their prompts byte for byte on any split and seed (tested against their script's own output on
dev_seen with seed 7, and against every published prompt, seed 1987):

1. *load*: the confounder rows of the split (every row of the file, exact duplicates included) merged onto
   the caption table in its row order; then the rows with a shared-image group, sorted stably by (group,
   label descending), followed by the rows with a shared-text group, sorted the same way;
2. *shuffle*: each row's rank inside its group (0, 1, ...), the rows permuted by
   ``RandomState(seed).permutation``, then sorted by that rank with numpy 1.23's unstable quicksort;
3. *targets*: the groups holding both labels, sorted; the member lines of target groups, each line kept
   where it first occurs (so a meme listed by both kinds, or in two groups, is listed once);
4. *per target i*: every group gets a distinct rank from ``default_rng(seed + i).choice(n + 1, n)``, in
   order of first appearance, the target 99999 (so it sorts last); the members are sorted by their group's
   rank with numpy 1.23's quicksort, which also decides the order of members inside each group; the k-shot
   prompt holds the first k groups, each with its gold answer, then the target;
5. prompts longer than ``char_cap`` characters are dropped, never trimmed (published: k = 0..4, 2,000).

What made the published member order and draw look irreproducible: the two single-key sorts of steps 2
and 4 go through ``numpy.argsort(kind="quicksort")``, whose order among equal keys changed after numpy
1.23 (SIMD sorts, chosen by CPU); ``memefx.icl.npsort`` replays the numpy 1.23 algorithm. memefx's earlier
layout also applied the per-target ranks to targets sorted by anchor, where step 4 applies them in order of
first appearance after the shuffle.

Reference behaviours kept for exactness: the header's last index is the number of ``#`` in the zero-shot
prompt minus one, so a ``#`` inside a meme text or description raises it; a demonstration's answer lists
every hateful member joined by " and ", and one with no hateful member left (its line kept in another
group) reads "The most likely hateful or sarcastic pair is , with ..."; a target whose every line is kept
in another group still gets its prompts, with no pair of its own (header "#0 to #-1", no ``member_ids``;
train, seed 1987: group 61458); labels come from the confounder table; a meme the caption table lacks is
left out by the merge (memefx refuses such a table instead, naming the ids).

**Replay** (``replay_published``): read the prompts of the authors' answer file (one row per target group,
shot count and pair, with the prompt text), map every pair of every prompt back to its meme through the HMC
texts and the image descriptions, and rebuild each prompt from those memes. A rebuilt prompt equal to the
published one byte for byte proves the mapping; a new model then runs on exactly the published prompts and
its answers compare with the published ones pair by pair. Pairs that match no meme, or several, are listed
per prompt (column ``unmapped``), never guessed.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memefx.icl.grammar import (
    INSTRUCTION,
    Block,
    Member,
    PromptInputError,
    gold_answer,
    member_line,
    parse_prompt,
    render,
)
from memefx.icl.npsort import argsort_numpy123
from memefx.schema import KIND_COLUMN

PUBLISHED_SEED = 1987
PUBLISHED_CHAR_CAP = 2000
PUBLISHED_SHOTS = (0, 1, 2, 3, 4)
TARGET_RANK = 99999  # the authors' sort key of the target group: after every drawn rank
_KINDS = ("shared_image", "shared_text")  # the authors' order: image groups first, then text groups


def _check_fields(ids: Sequence[str], texts: Mapping[str, object], descriptions: Mapping[str, object],
                  what: str) -> None:
    """Every id needs a meme text and a description that are strings (NaN from a table is an error)."""
    no_text = [i for i in ids if not isinstance(texts.get(i), str)]
    no_desc = [i for i in ids if not isinstance(descriptions.get(i), str)]
    problems = []
    if no_text:
        problems.append(f"{len(no_text)} have no meme text (missing or NaN): ids {', '.join(no_text[:10])}"
                        f"{', ...' if len(no_text) > 10 else ''}")
    if no_desc:
        problems.append(f"{len(no_desc)} have no image description (missing or NaN): ids {', '.join(no_desc[:10])}"
                        f"{', ...' if len(no_desc) > 10 else ''}")
    if problems:
        raise PromptInputError(f"{what}: " + "; ".join(problems) + ". Fill them in (memefx icl describe writes "
                        "descriptions) or leave these memes out of the confounder table")


def read_confounder_rows(path: str | Path) -> pd.DataFrame:
    """The confounder table as the authors' script reads it: validated and normalized as ``read_confounders``
    does, but every exact duplicate row kept (each copy is one more member row in their shuffle, so dropping
    it changes every draw)."""
    from memefx.data.hmc import normalize_id
    from memefx.data.tables import read_confounders

    path = Path(path)
    with warnings.catch_warnings():  # duplicates are data here, not a defect to report
        warnings.filterwarnings("ignore", message=".*duplicate rows", category=UserWarning)
        table = read_confounders(path)
    raw = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
    copies = Counter((str(s), normalize_id(i, f"{path} row {n}"))
                     for n, (s, i) in enumerate(zip(raw.split, raw.id)))
    repeats = [copies[(s, i)] for s, i in zip(table.split, table.id)]
    return table.loc[table.index.repeat(repeats)].reset_index(drop=True)


def group_rows(confounders: pd.DataFrame, split: str) -> pd.DataFrame:
    """One row per (anchor, kind, member) of a split: both kinds of confounder group, merged by anchor id.

    ``confounders``: as ``read_confounders`` returns it (no group = None)."""
    rows = confounders[confounders.split == split]
    parts = []
    for kind, column in KIND_COLUMN.items():
        part = rows[rows[column].notna()]
        parts.append(pd.DataFrame({"anchor": part[column].astype(str).values, "kind": kind,
                                   "id": part.id.astype(str).values, "label": part.label.astype(int).values}))
    return pd.concat(parts, ignore_index=True)


def _anchor(value: object) -> str | None:
    """A group column's anchor id, or None for no group (None or NaN, as a table column holds it)."""
    return value if isinstance(value, str) else None


def _loaded_rows(confounders: pd.DataFrame, split: str, caption_order: Sequence[str]) -> pd.DataFrame:
    """Step 1: the split's confounder rows in caption-table order (an inner merge onto that table), then per
    kind the rows with a group, stably sorted by (group, label descending). Columns id, label, group."""
    rows = confounders[confounders.split == split]
    by_id: dict[str, list[tuple[str, int, str | None, str | None]]] = {}
    image_column, text_column = (KIND_COLUMN[kind] for kind in _KINDS)
    for meme, label, image, text in zip(rows.id, rows.label, rows[image_column], rows[text_column]):
        by_id.setdefault(meme, []).append((meme, int(label), _anchor(image), _anchor(text)))
    listed = set(caption_order)
    absent = sorted({m for m, rs in by_id.items() if m not in listed and any(r[2] or r[3] for r in rs)})
    if absent:
        raise PromptInputError(f"split {split!r}: {len(absent)} confounder-group members are not in the caption "
                               f"table (ids {', '.join(absent[:10])}{', ...' if len(absent) > 10 else ''}); the "
                               "published procedure would silently leave them out: describe them first")
    merged = [row for meme in caption_order for row in by_id.get(meme, ())]
    out: list[tuple[str, int, str]] = []
    for column in (2, 3):  # shared image, then shared text
        part = [(row[0], row[1], row[column]) for row in merged if row[column] is not None]
        out += sorted(part, key=lambda r: (r[2], -r[1]))  # Python's sort is stable, as pandas' multi-key sort
    return pd.DataFrame(out, columns=["id", "label", "group"])


def _shuffled(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Step 2: rank inside the group, seeded permutation (``DataFrame.sample(frac=1)``), then the rows sorted
    by rank with numpy 1.23's quicksort, whose tie order decides which of equal-rank rows comes first."""
    rank = rows.groupby("group", sort=False).cumcount().to_numpy()
    permutation = np.random.RandomState(seed).permutation(len(rows))
    rows, rank = rows.iloc[permutation].reset_index(drop=True), rank[permutation]
    return rows.iloc[argsort_numpy123(rank)].reset_index(drop=True)


@dataclass(frozen=True)
class PublishedMembers:
    """The authors' member table of a split after the shuffle (steps 1-3).

    Attributes:
        targets: groups holding both labels, sorted; the i-th draws its demonstrations with ``seed + i``.
        rows: group, id, label, line of every target-group member in shuffled order, each line once (where
            it first occurs).
    """

    targets: list[str]
    rows: pd.DataFrame


def published_groups(confounders: pd.DataFrame, split: str, texts: Mapping[str, str],
                     descriptions: Mapping[str, str], seed: int = PUBLISHED_SEED) -> PublishedMembers:
    """Target groups and their members the authors' way (steps 1-3 of the module docstring).

    ``confounders``: every row of the table, duplicates included (``read_confounder_rows``).
    ``descriptions``: meme id -> image description, iterated in the caption table's row order (the authors
    merge onto that table, so its order decides ties). ``texts``: meme id -> the meme's own text."""
    rows = _loaded_rows(confounders, split, list(descriptions))
    if rows.empty:
        raise PromptInputError(f"split {split!r}: the confounder table lists no shared-image or shared-text groups")
    labels = rows[rows.label.isin([0, 1])].groupby("group").label.nunique()
    targets = sorted(labels[labels == 2].index)
    if not targets:
        raise PromptInputError(f"split {split!r}: no confounder group holds both a hateful and a benign meme")
    members = _shuffled(rows, seed)
    members = members[members.group.isin(targets)].reset_index(drop=True)
    _check_fields(sorted(set(members.id)), texts, descriptions, f"split {split!r}: of its target-group members")
    members["line"] = [member_line(texts[i], descriptions[i]) for i in members.id]
    members = members.drop_duplicates("line").reset_index(drop=True)
    return PublishedMembers(targets, members[["group", "id", "label", "line"]])


def group_ranks(groups: Sequence[str], target: str, index: int, seed: int = PUBLISHED_SEED) -> dict[str, int]:
    """Step 4's sort keys for the ``index``-th target: distinct ranks drawn by ``default_rng(seed + index)``
    for ``groups`` in order of first appearance after the shuffle; the target gets ``TARGET_RANK``."""
    draws = np.random.default_rng(seed + index).choice(len(groups) + 1, size=len(groups), replace=False)
    ranks = {group: int(rank) for group, rank in zip(groups, draws)}
    ranks[target] = TARGET_RANK
    return ranks


def _authors_answer(labels: Sequence[int]) -> str:
    """A demonstration's answer as the authors wrote it: every hateful member, joined by " and " (none left:
    an empty list, kept as they had it)."""
    hateful = " and ".join(f"#{j}" for j, label in enumerate(labels) if label == 1)
    return f"The most likely hateful or sarcastic pair is {hateful}, with the potential label 'hateful'."


def _lines(lines: Sequence[str]) -> str:
    return "\n".join(f"#{j}: {line}" for j, line in enumerate(lines))


def _sorted_blocks(groups: Sequence[str], codes: np.ndarray, target: str, index: int, seed: int
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """Step 4's sort for one target. ``codes``: each member's group as a position in ``groups``. Returns the
    member positions per group, groups in rank order, each in the sort's order; and the target's own."""
    ranks = group_ranks(groups, target, index, seed)
    keys = np.asarray([ranks[g] for g in groups], dtype=np.int64)[codes]
    order = argsort_numpy123(keys)
    ordered = keys[order]
    return np.split(order, np.flatnonzero(np.diff(ordered)) + 1), order[ordered == TARGET_RANK]


def _target_prompts(lines: Sequence[str], labels: Sequence[int], blocks: Sequence[np.ndarray], own: np.ndarray,
                    max_k: int) -> list[str]:
    """The authors' prompts of one target for k = 0..max_k: the first k blocks with their answers, then the
    target's lines; the header's last index counts every '#' of the zero-shot prompt, as the authors did."""
    zero = _lines([lines[j] for j in own]) + "\nSystem:"
    head = "User: " + INSTRUCTION.format(last=zero.count("#") - 1) + "\n"
    records = [f"{_lines([lines[j] for j in b])}\nSystem:\n\n{_authors_answer([labels[j] for j in b])}\n\nUser:\n"
               for b in blocks[:max_k]]
    return [head + "".join(records[:k]) + zero for k in range(max_k + 1)]


def group_dir(target: str, labels: Sequence[int]) -> str:
    """The folder the authors' script writes a target's prompts to: ``{group}_{hateful places}_pos_max_{last}``."""
    hateful = "_".join(str(j) for j, label in enumerate(labels) if label == 1)
    return f"{target}_{hateful}_pos_max_{len(labels) - 1 if len(labels) else 'nan'}"


def published_prompt_table(confounders: pd.DataFrame, split: str, texts: Mapping[str, str],
                           descriptions: Mapping[str, str], shots: Sequence[int] = PUBLISHED_SHOTS,
                           seed: int = PUBLISHED_SEED, char_cap: int | None = PUBLISHED_CHAR_CAP) -> pd.DataFrame:
    """Pair-selection prompts of a split by the authors' procedure, one row per kept (target, shot count).

    Arguments as for ``published_groups``. Columns: group, group_dir (the authors' folder name), few_shot_num,
    prompt, member_ids, member_labels, demo_groups, chars. Prompts longer than ``char_cap`` characters are
    dropped (never trimmed); ``table.attrs['dropped']`` counts them per shot count."""
    members = published_groups(confounders, split, texts, descriptions, seed)
    rows, max_k = members.rows, max(shots, default=0)
    groups = list(rows.group.unique())  # order of first appearance: the order ranks are drawn in
    codes = rows.group.map({g: c for c, g in enumerate(groups)}).to_numpy()
    lines, labels, ids = rows.line.tolist(), [int(x) for x in rows.label], rows.id.tolist()
    out, dropped = [], {int(k): 0 for k in shots}
    for index, target in enumerate(members.targets):
        blocks, own = _sorted_blocks(groups, codes, target, index, seed)
        if max_k > len(blocks) - 1:
            raise PromptInputError(f"split {split!r}: {max_k}-shot prompts need {max_k} other target groups, "
                                   f"only {len(blocks) - 1} exist")
        prompts = _target_prompts(lines, labels, blocks, own, max_k)
        demos = [rows.group.iat[b[0]] for b in blocks[:max_k]]
        own_labels = [labels[j] for j in own]
        for k in (int(k) for k in shots):
            if char_cap is not None and len(prompts[k]) > char_cap:
                dropped[k] += 1
                continue
            out.append({"group": target, "group_dir": group_dir(target, own_labels), "few_shot_num": k,
                        "prompt": prompts[k], "member_ids": [ids[j] for j in own], "member_labels": own_labels,
                        "demo_groups": demos[:k], "chars": len(prompts[k])})
    table = pd.DataFrame(out, columns=["group", "group_dir", "few_shot_num", "prompt", "member_ids", "member_labels",
                                       "demo_groups", "chars"])
    table.attrs["dropped"] = dropped
    return table


# ---------------------------------------------------------------------------------------------- replay

def _anchors_by_id(confounders: pd.DataFrame | None, split: str) -> dict[str, set[str]]:
    if confounders is None:
        return {}
    out: dict[str, set[str]] = {}
    for anchor, meme in zip(*group_rows(confounders, split)[["anchor", "id"]].T.values):
        out.setdefault(meme, set()).add(anchor)
    return out


def _resolve_block(candidates: list[list[str]], anchors: Mapping[str, set[str]], group: str | None
                   ) -> tuple[list[list[str]], str | None]:
    """Narrow each pair's candidate memes to one confounder group: the target's own group, or the one group
    every pair of a demonstration block can belong to. Returns the narrowed candidates and that group."""
    if not anchors:
        return candidates, group
    if group is None:
        common = None
        for cands in candidates:
            found = set().union(*(anchors.get(i, set()) for i in cands)) if cands else set()
            common = found if common is None else common & found
        group = next(iter(common)) if common and len(common) == 1 else None
    if group is None:
        return candidates, None
    narrowed = [[i for i in cands if group in anchors.get(i, set())] or cands for cands in candidates]
    return narrowed, group


def replay_published(answers: pd.DataFrame, texts: Mapping[str, str], descriptions: Mapping[str, str],
                     labels: Mapping[str, int], confounders: pd.DataFrame | None = None,
                     split: str = "dev_seen", source: str = "published answers") -> pd.DataFrame:
    """The published prompts as a prompt table, every pair mapped back to its meme.

    ``answers``: the answer file (columns image_id, few_shot_num, prompt; ans_num and ground_truth when
    present are checked against the mapped labels). ``texts``/``descriptions``/``labels``: meme id -> HMC
    text, image description, gold label (``descriptions`` in the caption table's row order). ``confounders``
    (optional; every row, as ``read_confounder_rows`` reads it) narrows a pair that several memes match
    (same text and description) to the block's confounder group, and then to the meme the published
    procedure (seed 1987) keeps there (``published_groups``: each line where it first occurs after the shuffle).

    Columns: group, few_shot_num, prompt (the published text), member_ids, member_labels (pair #0, #1, ...
    of the target block; "" and -1 for an unmapped pair), demo_groups, demo_member_ids, rebuilt (the
    prompt re-rendered from the mapped memes equals the published one byte for byte), unmapped (one line
    per pair that could not be mapped, or whose label disagrees with the file's ground_truth).
    """
    missing = [c for c in ("image_id", "few_shot_num", "prompt") if c not in answers]
    if missing:
        raise PromptInputError(f"{source}: lacks columns {missing} (has {list(answers.columns)}); expected the published "
                        "answer file (one row per target group, shot count and pair, with the prompt text)")
    if answers.empty:
        raise PromptInputError(f"{source}: holds no answer rows (a header only?): nothing to replay")
    index: dict[str, list[str]] = {}
    for meme in texts:
        if isinstance(texts.get(meme), str) and isinstance(descriptions.get(meme), str):
            index.setdefault(member_line(texts[meme], descriptions[meme]), []).append(meme)
    anchors = _anchors_by_id(confounders, split)
    # the meme the published procedure keeps for a (group, line) that several memes share
    kept: dict[tuple[str, str], str] = {}
    if confounders is not None:
        rows = published_groups(confounders, split, texts, descriptions).rows
        kept = dict(zip(zip(rows.group, rows.line), rows.id))
    truth: dict[tuple[str, int, int], int] = {}
    if {"ans_num", "ground_truth"} <= set(answers.columns):
        for g, k, n, y in zip(answers.image_id, answers.few_shot_num, answers.ans_num, answers.ground_truth):
            truth[(_group_id(g), int(k), int(n))] = int(y)
    prompts = answers.drop_duplicates(["image_id", "few_shot_num", "prompt"])
    clash = prompts[prompts.duplicated(["image_id", "few_shot_num"], keep=False)]
    if len(clash):
        first = clash.iloc[0]
        raise PromptInputError(f"{source}: group {first.image_id}, {first.few_shot_num}-shot has several different prompts; "
                        "one prompt per (image_id, few_shot_num) is expected")
    out = []
    for row_number, row in zip(prompts.index, prompts.itertuples(index=False)):
        group, shots, prompt = _group_id(row.image_id), int(row.few_shot_num), row.prompt
        where = f"{source} row {row_number} (group {group}, {shots}-shot)"  # data row from 0: prompts span lines
        if not isinstance(prompt, str):
            raise PromptInputError(f"{where}: prompt is {prompt!r}, not text")
        try:
            blocks = parse_prompt(prompt)
        except ValueError as err:
            raise PromptInputError(f"{where}: not a pair-selection prompt ({err})") from None
        problems: list[str] = []
        mapped_blocks: list[list[str]] = []
        demo_groups: list[str | None] = []
        for b, block in enumerate(blocks):
            is_target = b == len(blocks) - 1
            lines = [member_line(m.text, m.description) for m in block.members]
            # the parsed fields are already cleaned; cleaning is idempotent, so the line is the published one
            candidates = [list(index.get(line, [])) for line in lines]
            candidates, found_group = _resolve_block(candidates, anchors, group if is_target else None)
            ids = []
            for p, (line, cands) in enumerate(zip(lines, candidates)):
                place = "target" if is_target else f"demonstration {b}"
                if len(cands) > 1 and kept.get((found_group, line)) in cands:
                    cands = [kept[(found_group, line)]]
                if len(cands) == 1:
                    ids.append(cands[0])
                    continue
                ids.append("")
                reason = "no meme has this text and description" if not cands else \
                    f"{len(cands)} memes match (ids {', '.join(sorted(cands))})"
                problems.append(f"{place} pair #{p}: {reason}: {line[:120]}")
            mapped_blocks.append(ids)
            if not is_target:
                demo_groups.append(found_group)
        target_ids = mapped_blocks[-1]
        target_labels = [int(labels[i]) if i else -1 for i in target_ids]
        for p, (meme, label) in enumerate(zip(target_ids, target_labels)):
            published = truth.get((group, shots, p))
            if meme and published is not None and published != label:
                problems.append(f"target pair #{p}: meme {meme} has label {label}, the file's ground_truth is {published}")
        rebuilt = False
        if all(all(ids) for ids in mapped_blocks):
            rebuilt_blocks = []
            for b, ids in enumerate(mapped_blocks):
                members = [Member(texts[i], descriptions[i], int(labels[i])) for i in ids]
                rebuilt_blocks.append(Block(tuple(members), gold_answer(members) if b < len(mapped_blocks) - 1 else None))
            rebuilt = render(rebuilt_blocks) == prompt
            if not rebuilt:
                problems.append("every pair mapped, but the prompt rendered from those memes differs from the "
                                "published text (a demonstration answer or the header disagrees with the gold labels)")
        out.append({"group": group, "few_shot_num": shots, "prompt": prompt, "member_ids": target_ids,
                    "member_labels": target_labels, "demo_groups": [g or "" for g in demo_groups],
                    "demo_member_ids": [ids for ids in mapped_blocks[:-1]], "rebuilt": rebuilt,
                    "unmapped": problems})
    table = pd.DataFrame(out, columns=["group", "few_shot_num", "prompt", "member_ids", "member_labels", "demo_groups",
                                       "demo_member_ids", "rebuilt", "unmapped"])
    pairs = sum(len(ids) for ids in table.member_ids)
    if pairs and not any(i for ids in table.member_ids for i in ids):
        raise PromptInputError(
            f"{source}: none of the {pairs} target pairs of its {len(table)} prompts matches a meme of split {split!r} "
            "by text and description: the answer file belongs to other data (check --hmc, --captions, --split and "
            "--description-column)")
    return table


def _group_id(value: object) -> str:
    """The published file writes group ids as integers (1456); memefx keys them as 5-digit strings."""
    if isinstance(value, float) and not math.isnan(value) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text.zfill(5) if re.fullmatch(r"\d+", text) else text
