"""Prompts for in-context evaluation (SPEC section 5): the published pair-selection layout, the per-meme
prompt memefx adds, and a seeded demonstration sampler.

Pair selection, exactly as in the ``prompt`` column of the published answers::

    User: Out of image-caption pairs #0 to #<n-1>, select ... say 'All pairs are benign'.
    #0: caption: '<meme text>', image: '<description>'      <- first demonstration (or the target)
    System:

    The most likely hateful or sarcastic pair is #i, with the potential label 'hateful'.

    User:
    #0: caption: ...                                        <- next demonstration, then the target
    System:

Inside the fields the words "caption" and "image" become "text" and "picture", so a field cannot be
mistaken for the layout. Plain ``User:``/``System:`` turns, no chat template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

INSTRUCTION = ("Out of image-caption pairs #0 to #{last}, select the most likely hateful or sarcastic pair, together "
               "with potential label (hateful or sarcastic). If all pairs are benign, say 'All pairs are benign'.")
BENIGN_ANSWER = "All pairs are benign."
_LINE = re.compile(r"^#(\d+): caption: '(.*?)', image: '(.*)'$")


@dataclass(frozen=True)
class Member:
    text: str
    description: str
    label: int = -1  # gold label, used for demonstration answers


@dataclass(frozen=True)
class Block:
    members: tuple[Member, ...]
    answer: str | None = None  # the gold answer shown after a demonstration; None for the target


def clean_field(value: str) -> str:
    """Replace the layout's own words inside a field (caption -> text, image -> picture)."""
    value = re.sub(r"caption", "text", value, flags=re.I)
    return re.sub(r"image", "picture", value, flags=re.I)


def gold_answer(members: Sequence[Member]) -> str:
    """The demonstration answer: the hateful member(s), or that all pairs are benign."""
    hateful = [f"#{i}" for i, m in enumerate(members) if m.label == 1]
    if not hateful:
        return BENIGN_ANSWER
    return f"The most likely hateful or sarcastic pair is {' and '.join(hateful)}, with the potential label 'hateful'."


def _lines(members: Sequence[Member]) -> str:
    return "\n".join(f"#{i}: caption: '{clean_field(m.text)}', image: '{clean_field(m.description)}'"
                     for i, m in enumerate(members))


def pair_prompt(target: Sequence[Member], demonstrations: Sequence[Sequence[Member]] = ()) -> str:
    """The pair-selection prompt for one target stratum with k demonstrations (other strata)."""
    blocks = [Block(tuple(d), gold_answer(d)) for d in demonstrations] + [Block(tuple(target))]
    return render(blocks)


def render(blocks: Sequence[Block]) -> str:
    """Blocks -> prompt text; the last block is the target and has no answer."""
    head = "User: " + INSTRUCTION.format(last=len(blocks[-1].members) - 1) + "\n"
    parts = []
    for k, block in enumerate(blocks):
        parts.append((head if k == 0 else "User:\n") + _lines(block.members) + "\nSystem:")
        if block.answer is not None:
            parts.append(f"\n\n{block.answer}\n\n")
    return "".join(parts)


def parse_prompt(prompt: str) -> list[Block]:
    """Prompt text -> blocks (members and demonstration answers): the inverse of ``render``."""
    chunks = re.split(r"(?:^|\n\n)User:(?: Out of image-caption pairs #0 to #\d+, select.*?'All pairs are benign'\.)?\n",
                      prompt, flags=re.S)
    blocks = []
    for chunk in (c for c in chunks if c):
        body, _, answer = chunk.partition("\nSystem:")
        members = []
        for line in body.split("\n"):
            match = _LINE.match(line)
            if not match:
                raise ValueError(f"prompt line is not a pair: {line[:80]!r}")
            members.append(Member(match.group(2), match.group(3)))
        answer = answer.strip("\n") or None
        blocks.append(Block(tuple(members), answer))
    return blocks


def meme_prompt(text: str, description: str) -> tuple[str, tuple[str, str]]:
    """Per-meme prompt (memefx's addition) and its two label continuations, scored by log-probability."""
    prompt = (f"User: Is this meme hateful or benign? caption: '{clean_field(text)}', image: "
              f"'{clean_field(description)}'. Answer with one word.\nSystem:")
    return prompt, (" benign", " hateful")


def sample_demonstrations(pool: Sequence[str], target: str, k: int, seed: int,
                          cost: Callable[[str], int] | None = None, budget: int | None = None) -> list[str]:
    """k demonstration strata for ``target``: never the target itself, drawn by a generator seeded with
    (seed, target) so each target's draw is reproducible on its own; under a ``budget`` of ``cost`` units
    (tokens), the last drawn demonstrations are dropped until the prompt fits."""
    others = sorted(s for s in pool if s != target)
    if k > len(others):
        raise ValueError(f"k={k} demonstrations requested but only {len(others)} other strata exist")
    chosen = random.Random(f"{seed}:{target}").sample(others, k)
    if budget is not None and cost is not None:
        while chosen and sum(cost(s) for s in chosen) + cost(target) > budget:
            chosen.pop()
    return chosen


def build_prompt_table(members: pd.DataFrame, texts: dict[str, str], descriptions: dict[str, str],
                       shots: Sequence[int] = (0, 1, 2, 3, 4), seed: int = 0, budget: int | None = None,
                       cost: Callable[[str], int] | None = None) -> pd.DataFrame:
    """One pair-selection prompt per (stratum, shot count).

    ``members``: rows of one split and kind from ``strata_members`` (id, anchor, label). Demonstrations are
    other strata of the same table, drawn per target by ``sample_demonstrations``; with a ``budget``,
    ``cost`` measures a rendered prompt (e.g. its token count) and demonstrations are dropped until it fits.
    """
    import json

    groups = {a: rows.sort_values("id") for a, rows in members.groupby("anchor")}

    def as_members(anchor: str) -> list[Member]:
        rows = groups[anchor]
        return [Member(texts[i], descriptions[i], int(lab)) for i, lab in zip(rows.id, rows.label)]

    out = []
    for anchor in sorted(groups):
        target = as_members(anchor)
        for k in shots:
            demos = sample_demonstrations(list(groups), anchor, k, seed)
            prompt = pair_prompt(target, [as_members(d) for d in demos])
            while budget is not None and cost is not None and demos and cost(prompt) > budget:
                demos = demos[:-1]
                prompt = pair_prompt(target, [as_members(d) for d in demos])
            out.append({"group": anchor, "few_shot_num": len(demos), "requested_shots": k, "prompt": prompt,
                        "member_ids": json.dumps(groups[anchor].id.tolist()),
                        "gold_labels": json.dumps([m.label for m in target]), "demonstrations": json.dumps(demos),
                        "gold_answer": gold_answer(target)})
    return pd.DataFrame(out)
