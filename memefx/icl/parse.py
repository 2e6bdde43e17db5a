"""Free-form LLM answers to the pair-selection prompt -> per-pair verdicts (SPEC section 5).

The published study labeled these by hand. Rules, applied to the answer up to the point where the model
starts writing the next dialogue turn (``User:``):
- "All pairs are benign" (before any selected pair) -> functional, formatted, every pair benign;
- a selected pair ``#k`` (or "pair k") with a label word hateful / sarcastic near it -> functional; the
  selected pair gets that label, every other pair is benign; formatted when the sentence follows the
  asked pattern ("... pair is #k ... label ...");
- anything else (garbage, empty, truncated, a refusal, an essay) -> non-functional: no verdict.
Never raises on a string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

_TURN = re.compile(r"\n\s*(User|System)\s*:", re.I)
_BENIGN = re.compile(r"(?:all|both) (?:the |of the )?(?:image[- ]caption )?pairs (?:are|seem|appear to be) (?:likely )?benign",
                     re.I)
_PAIR = re.compile(r"(?:pair\s*(?:is\s*)?#?\s*|#)(\d+)|\b(first|second|third|fourth|fifth) pair\b", re.I)
_ORDINAL = {"first": 0, "second": 1, "third": 2, "fourth": 3, "fifth": 4}
_ECHO = re.compile(r"hateful\s*(?:or|/|and)\s*sarcastic|sarcastic\s*(?:or|/|and)\s*hateful", re.I)
_LABEL = re.compile(r"\b(hateful|sarcastic|sarcasm|hate)\b", re.I)
_PLAN = re.compile(r"\b(?:will|should)\b", re.I)
_OPENING = 130  # (chosen on the hand labels: 120-140 agree alike) a verdict that starts later follows a preamble: functional, but not the asked format


@dataclass(frozen=True)
class Verdict:
    functional: bool
    formatted: bool
    selected: int | None  # pair index the model picked, None when all benign or non-functional
    label: str | None  # "hateful" or "sarcastic" for the selected pair


def first_turn(answer: object) -> str:
    """The model's own answer: text before it starts the next ``User:``/``System:`` turn."""
    if not isinstance(answer, str):
        return ""
    text = answer.strip()
    match = _TURN.search(text)
    return text[: match.start()] if match else text


def _sentence(text: str, pos: int) -> str:
    start = max(text.rfind(c, 0, pos) for c in ".!?\n") + 1
    ends = [i for i in (text.find(c, pos) for c in ".!?\n") if i >= 0]
    return text[start: min(ends) if ends else len(text)]


def _first(pattern: re.Pattern, text: str) -> re.Match | None:
    """First match that states a verdict, not a plan ("I will select the most likely pair ...")."""
    for match in pattern.finditer(text):
        if not _PLAN.search(_sentence(text, match.start())):
            return match
    return None


def parse_answer(answer: object, n_pairs: int | None = None) -> Verdict:
    """Verdict of one answer; ``n_pairs`` (when known) rejects pair numbers outside the prompt.

    ``formatted``: the verdict comes first (within the opening ``_OPENING`` characters), as asked.
    """
    text = first_turn(answer)
    if text.lstrip().startswith(("*", "###")):  # role play of the dialogue, not an answer
        return Verdict(False, False, None, None)
    benign = _first(_BENIGN, text)
    pair = _first(_PAIR, text)
    lead = len(text) - len(text.lstrip())
    if benign and (pair is None or benign.start() < pair.start()):
        return Verdict(True, benign.start() - lead < _OPENING, None, None)
    if pair is None:
        return Verdict(False, False, None, None)
    index = int(pair.group(1)) if pair.group(1) else _ORDINAL[pair.group(2).lower()]
    if n_pairs is not None and not 0 <= index < n_pairs:
        return Verdict(False, False, None, None)
    plain = _ECHO.sub(lambda m: " " * len(m.group(0)), text)  # the prompt's "hateful or sarcastic" is no label
    label = _LABEL.search(plain, pair.end()) or _LABEL.search(plain)
    if label is None:
        return Verdict(False, False, None, None)
    word = label.group(1).lower()
    label_name = "sarcastic" if word.startswith("sarcas") else "hateful"
    return Verdict(True, pair.start() - lead < _OPENING, index, label_name)


_PAIRS_IN_PROMPT = re.compile(r"Out of image-caption pairs #0 to #(\d+)")


def pairs_in_prompt(prompt: object) -> int | None:
    """Number of pairs the target block of a prompt asks about (it ends every prompt)."""
    if not isinstance(prompt, str):
        return None
    found = _PAIRS_IN_PROMPT.findall(prompt)
    return int(found[-1]) + 1 if found else None


def parse_table(answers: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """Add ``parsed_is_*`` columns to an answers table (one row per target group, shot count and pair).

    ``column``: the answer text column; default ``extracted_info`` when present, else ``generated_text``.
    """
    column = column or ("extracted_info" if "extracted_info" in answers else "generated_text")
    missing = [c for c in (column, "ans_num") if c not in answers]
    if missing:
        raise ValueError(f"answers table lacks columns {missing} (has {list(answers.columns)})")
    out = answers.copy()
    verdicts = [parse_answer(a, pairs_in_prompt(p)) for a, p in
                zip(out[column], out["prompt"] if "prompt" in out else [None] * len(out))]
    pair = pd.to_numeric(out["ans_num"], errors="coerce")
    functional = pd.Series([v.functional for v in verdicts], index=out.index)
    chosen = pd.Series([v.selected for v in verdicts], index=out.index)
    label = pd.Series([v.label for v in verdicts], index=out.index)
    picked = functional & (chosen == pair)
    out["parsed_is_functional"] = functional.astype(int)
    out["parsed_is_formatted"] = pd.Series([v.formatted for v in verdicts], index=out.index).astype(int)
    out["parsed_is_hateful"] = (picked & (label == "hateful")).astype(int)
    out["parsed_is_sarcastic"] = (picked & (label == "sarcastic")).astype(int)
    out["parsed_is_benign"] = (functional & ~picked).astype(int)
    out["parsed_is_hateful_or_sarcastic"] = (out.parsed_is_hateful | out.parsed_is_sarcastic).astype(int)
    return out
