"""The pair-selection prompt grammar, in one place: members and blocks, rendering, parsing, the member
line pattern, gold answers. Prompt building (``prompts``, ``published``), answer parsing (``parse``) and the
meta-gradient spans all read prompts through this module.

The layout, exactly as in the ``prompt`` column of the published answers::

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

import re
from collections.abc import Sequence
from dataclasses import dataclass

INSTRUCTION = ("Out of image-caption pairs #0 to #{last}, select the most likely hateful or sarcastic pair, together "
               "with potential label (hateful or sarcastic). If all pairs are benign, say 'All pairs are benign'.")
BENIGN_ANSWER = "All pairs are benign."
PAIR_LINE = re.compile(r"^#(\d+): caption: '(.*?)', image: '(.*)'$")
PAIR_LINES = re.compile(PAIR_LINE.pattern, re.M)  # the same line, searched through a whole prompt


class PromptInputError(ValueError):
    """Input that cannot make prompts (missing text or description, unknown layout): names the file, ids and
    what to do. A ValueError, so every memefx command reports it as a user error."""


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
    """Replace the layout's own words inside a field (caption -> text, image -> picture), as the published
    procedure did: plain substring replacement of the lowercase words, so its prompts are reproduced exactly."""
    return value.replace("caption", "text").replace("image", "picture")


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
    """Prompt text -> blocks (members and demonstration answers): the inverse of ``render``.

    The header's "#0 to #N" is not read: the published procedure derives N from the '#' characters of the
    zero-shot prompt, so a meme text holding '#' raises it, and a target that lost every member to other
    groups gets "#0 to #-1" over an empty block (parsed as a block with no members)."""
    chunks = re.split(r"(?:^|\n\n)User:(?: Out of image-caption pairs #0 to #-?\d+, select.*?'All pairs are benign'\.)?\n",
                      prompt, flags=re.S)
    blocks = []
    for chunk in (c for c in chunks if c):
        body, _, answer = chunk.partition("\nSystem:")
        members = []
        for line in body.split("\n") if body else ():
            match = PAIR_LINE.match(line)
            if not match:
                raise ValueError(f"prompt line is not a pair: {line[:80]!r}")
            members.append(Member(match.group(2), match.group(3)))
        answer = answer.strip("\n") or None
        blocks.append(Block(tuple(members), answer))
    return blocks


def pairs_in_prompt(prompt: object) -> int | None:
    """Number of pairs the target block of a prompt lists (the block that ends every prompt): its ``#k:``
    member lines, counted by ``parse_prompt``. The header's "#0 to #N" is no count: the
    published procedure takes N from the '#' characters of the zero-shot prompt, so a meme text holding '#'
    inflates it. None for what is no pair-selection prompt."""
    if not isinstance(prompt, str):
        return None
    try:
        blocks = parse_prompt(prompt)
    except ValueError:
        return None
    return len(blocks[-1].members) if blocks else None


def member_line(text: str, description: str) -> str:
    """A member as the prompt writes it after ``#k: `` (the key that maps a published pair to its meme)."""
    return f"caption: '{clean_field(text)}', image: '{clean_field(description)}'"
