"""The published pair-selection prompt set, two ways (SPEC section 5).

**Replay** (``replay_published``): read the prompts of the authors' answer file (one row per target group,
shot count and pair, with the prompt text), map every pair of every prompt back to its meme through the HMC
texts and the image descriptions, and rebuild each prompt from those memes. A rebuilt prompt equal to the
published one byte for byte proves the mapping; a new model then runs on exactly the published prompts and
its answers compare with the published ones pair by pair. Pairs that match no meme, or several, are listed
per prompt (column ``unmapped``), never guessed.

**Procedure** (``published_prompt_table``): the published way of building prompts, for any split:
- candidate members: every meme of the split in a shared-image or a shared-text group, both kinds merged
  by their anchor id; a group is a *target* when it holds both labels;
- a member line that occurs more than once (the same meme listed by both kinds, or in two groups) is kept
  once: where it stands earliest in its group (shared-image members first, hateful first, then by id),
  ties going to the smaller anchor. On dev_seen this finds 97 target groups, as the published run did, and
  the published pairs in each of the 65 groups the published answer file shows (this rule was read off those
  groups: the other 32 have no published prompt to check it against);
- member order: one seeded permutation of the member table (the published run used seed 1987);
  demonstration order for the i-th target (sorted by anchor): a draw seeded with ``seed + i`` ranking every
  other target group; the k-shot prompt holds the first k demonstrations with their gold answers;
- prompts longer than ``char_cap`` characters are dropped, never trimmed (published: k = 0..4, 2,000).
The published member order and draw depended on the row order of the original pandas run and cannot be
recovered; the member sets of every group and the layout can, and are tested.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from memefx.icl.prompts import Block, Member, PromptInputError, clean_field, gold_answer, parse_prompt, render
from memefx.schema import KIND_COLUMN

PUBLISHED_SEED = 1987
PUBLISHED_CHAR_CAP = 2000
PUBLISHED_SHOTS = (0, 1, 2, 3, 4)
_KIND_ORDER = {"shared_image": 0, "shared_text": 1}


def member_line(text: str, description: str) -> str:
    """A member as the prompt writes it after ``#k: `` (the key that maps a published pair to its meme)."""
    return f"caption: '{clean_field(text)}', image: '{clean_field(description)}'"


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


def group_rows(confounders: pd.DataFrame, split: str) -> pd.DataFrame:
    """One row per (anchor, kind, member) of a split: both kinds of confounder group, merged by anchor id.

    ``confounders``: as ``read_confounders`` returns it (de-duplicated; no group = None)."""
    rows = confounders[confounders.split == split]
    parts = []
    for kind, column in KIND_COLUMN.items():
        part = rows[rows[column].notna()]
        parts.append(pd.DataFrame({"anchor": part[column].astype(str).values, "kind": kind,
                                   "id": part.id.astype(str).values, "label": part.label.astype(int).values}))
    return pd.concat(parts, ignore_index=True)


def published_groups(confounders: pd.DataFrame, split: str, texts: Mapping[str, str],
                     descriptions: Mapping[str, str], labels: Mapping[str, int] | None = None,
                     seed: int = PUBLISHED_SEED) -> dict[str, pd.DataFrame]:
    """Target groups of a split, the published way: anchor -> members (id, label, line) in prompt order.

    ``labels`` (e.g. from the HMC files) override the confounder table's labels when given."""
    members = group_rows(confounders, split)
    if members.empty:
        raise PromptInputError(f"split {split!r}: the confounder table lists no shared-image or shared-text groups")
    if labels is not None:
        members["label"] = [int(labels.get(i, lab)) for i, lab in zip(members.id, members.label)]
    both = members.groupby("anchor").label.agg(lambda s: {0, 1} <= set(s))
    members = members[members.anchor.isin(both[both].index)].copy()
    if members.empty:
        raise PromptInputError(f"split {split!r}: no confounder group holds both a hateful and a benign meme")
    _check_fields(sorted(set(members.id)), texts, descriptions, f"split {split!r}: of its target-group members")
    members["line"] = [member_line(texts[i], descriptions[i]) for i in members.id]
    # rank of each row inside its group: shared-image members first, hateful first, then by id
    members["kind_order"] = members.kind.map(_KIND_ORDER)
    members = members.sort_values(["anchor", "kind_order", "label", "id"], ascending=[True, True, False, True])
    members["rank"] = members.groupby("anchor").cumcount()
    members = members.sort_values(["rank", "anchor"], kind="stable").drop_duplicates("line")
    # one seeded permutation of the member table gives the order inside every group
    members = members.sort_values(["anchor", "rank"]).reset_index(drop=True)
    members = members.iloc[np.random.default_rng(seed).permutation(len(members))]
    return {anchor: rows[["id", "label", "line"]].reset_index(drop=True)
            for anchor, rows in members.groupby("anchor", sort=True)}


def demonstration_order(targets: Sequence[str], index: int, seed: int = PUBLISHED_SEED) -> list[str]:
    """Other target groups in the order the ``index``-th target draws them: ranks from a generator seeded
    with ``seed + index`` (the published run: 1987 + i), the target itself excluded."""
    ranks = np.random.default_rng(seed + index).choice(len(targets) + 1, size=len(targets), replace=False)
    order = sorted(range(len(targets)), key=lambda j: ranks[j])
    return [targets[j] for j in order if j != index]


def published_prompt_table(confounders: pd.DataFrame, split: str, texts: Mapping[str, str],
                           descriptions: Mapping[str, str], labels: Mapping[str, int] | None = None,
                           shots: Sequence[int] = PUBLISHED_SHOTS, seed: int = PUBLISHED_SEED,
                           char_cap: int | None = PUBLISHED_CHAR_CAP) -> pd.DataFrame:
    """Pair-selection prompts of a split by the published procedure, one row per kept (target, shot count).

    Columns: group, few_shot_num, prompt, member_ids, member_labels, demo_groups, chars. Prompts longer than
    ``char_cap`` characters are dropped (never trimmed); ``table.attrs['dropped']`` counts them per shot."""
    groups = published_groups(confounders, split, texts, descriptions, labels, seed)
    blocks = {anchor: [Member(texts[i], descriptions[i], int(label)) for i, label in zip(rows.id, rows.label)]
              for anchor, rows in groups.items()}
    targets = sorted(groups)
    max_k = max(shots, default=0)
    if max_k > len(targets) - 1:
        raise PromptInputError(f"split {split!r}: {max_k}-shot prompts need {max_k} other target groups, "
                        f"only {len(targets) - 1} exist")
    out, dropped = [], {int(k): 0 for k in shots}
    for index, anchor in enumerate(targets):
        demos = demonstration_order(targets, index, seed)
        for k in shots:
            chosen = demos[:k]
            prompt = render([Block(tuple(blocks[d]), gold_answer(blocks[d])) for d in chosen]
                            + [Block(tuple(blocks[anchor]))])
            if char_cap is not None and len(prompt) > char_cap:
                dropped[int(k)] += 1
                continue
            out.append({"group": anchor, "few_shot_num": int(k), "prompt": prompt,
                        "member_ids": groups[anchor].id.tolist(),
                        "member_labels": [int(x) for x in groups[anchor].label], "demo_groups": list(chosen),
                        "chars": len(prompt)})
    table = pd.DataFrame(out, columns=["group", "few_shot_num", "prompt", "member_ids", "member_labels",
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
    text, image description, gold label. ``confounders`` (optional) narrows a pair that several memes
    match (same text and description) to the block's confounder group, and then to the meme the published
    procedure keeps in that group (``published_groups``: one line per group, the earliest-ranked meme).

    Columns: group, few_shot_num, prompt (the published text), member_ids, member_labels (pair #0, #1, ...
    of the target block; "" and -1 for an unmapped pair), demo_groups, demo_member_ids, rebuilt (the
    prompt re-rendered from the mapped memes equals the published one byte for byte), unmapped (one line
    per pair that could not be mapped, or whose label disagrees with the file's ground_truth).
    """
    missing = [c for c in ("image_id", "few_shot_num", "prompt") if c not in answers]
    if missing:
        raise PromptInputError(f"{source}: lacks columns {missing} (has {list(answers.columns)}); expected the published "
                        "answer file (one row per target group, shot count and pair, with the prompt text)")
    index: dict[str, list[str]] = {}
    for meme in texts:
        if isinstance(texts.get(meme), str) and isinstance(descriptions.get(meme), str):
            index.setdefault(member_line(texts[meme], descriptions[meme]), []).append(meme)
    anchors = _anchors_by_id(confounders, split)
    # the meme the published procedure keeps for a (group, line) that several memes share
    kept: dict[tuple[str, str], str] = {}
    if confounders is not None:
        groups = published_groups(confounders, split, texts, descriptions, labels)
        kept = {(anchor, line): meme for anchor, rows in groups.items() for meme, line in zip(rows.id, rows.line)}
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
    return pd.DataFrame(out, columns=["group", "few_shot_num", "prompt", "member_ids", "member_labels", "demo_groups",
                                      "demo_member_ids", "rebuilt", "unmapped"])


def _group_id(value: object) -> str:
    """The published file writes group ids as integers (1456); memefx keys them as 5-digit strings."""
    if isinstance(value, float) and not math.isnan(value) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text.zfill(5) if re.fullmatch(r"\d+", text) else text
