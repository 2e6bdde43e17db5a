"""Free-form LLM answers to the pair-selection prompt -> per-pair verdicts (SPEC section 5).

The published study labeled answers by hand: per (prompt, pair) functional, formatted, hateful, sarcastic,
benign. The parser reproduces those labels with a few readable rules; which of them are on, and the
``formatted`` threshold, are the fields of ``Rules``. The labelled answers are split by target group into a
development part and a held-out part (``is_held_out``: a hash of the group id, fixed before any rule was
chosen). The defaults of ``Rules`` are ``choose_rules`` on the development part (a test checks that they
still are); rules added since the split were written looking at development answers only; the held-out
part only scores them (``benchmarks/parser_heldout.py --held-out``, and a test). The reading patterns
themselves predate the split: an earlier version wrote them against every labelled answer.

Reading an answer:
- the model's reply, role-played ``User:``/``System:`` turns included (``Rules.cut_turns`` stops at the first);
- "All pairs are benign" before any named pair -> functional, every pair benign;
- named pairs (``#k``, "pair k", "the first pair"; "#1 and #3" names both) with a label word near them ->
  functional; the named pairs get that label (hateful or sarcastic), every other pair is benign;
- a list that labels pairs one by one ("#0: benign / #1: hateful") -> each listed pair gets its label;
- ``formatted``: the verdict comes first, within the opening ``Rules.opening`` characters, as asked;
- anything else (garbage, empty, a refusal, a plan, an essay with no verdict) -> non-functional.
Never raises on a string, or on anything else.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

import pandas as pd

from memefx.icl.grammar import pairs_in_prompt

FIELDS = ("functional", "formatted", "hateful", "sarcastic", "benign")

_TURN = re.compile(r"\n\s*(User|System)\s*:", re.I)
_LEADING_USER = re.compile(r"^\s*User\s*:.*?\n\s*System\s*:", re.I | re.S)
_BENIGN = re.compile(r"(?:all|both) (?:the |of the )?(?:image[- ]caption )?pairs (?:are|seem|appear to be) "
                     r"(?:likely )?benign", re.I)
_LOOSE_BENIGN = re.compile(r"pairs (?:are|seem|appear to be) (?:all |likely )?benign|"
                           r"none of (?:them|the (?:image[- ]caption )?pairs|the captions) (?:are|is|contains?) "
                           r"(?:any )?(?:hateful|sarcastic)|"
                           r"(?:pairs|captions) (?:are|do) not (?:contain )?(?:any )?hateful or sarcastic", re.I)
_PAIR = re.compile(r"(?:pair\s*(?:is\s*)?#?\s*|#)(\d+)((?:\s*(?:,|and|&)\s*(?:pair\s*)?#\s*\d+)*)"
                   r"|\b(first|second|third|fourth|fifth) pair\b", re.I)
_MORE = re.compile(r"#\s*(\d+)")
_ORDINAL = {"first": 0, "second": 1, "third": 2, "fourth": 3, "fifth": 4}
_ECHO = re.compile(r"hateful\s*(?:or|/|and)\s*sarcastic|sarcastic\s*(?:or|/|and)\s*hateful", re.I)
_LABEL = re.compile(r"\b(hateful|sarcastic|sarcasm|hate)\b", re.I)
_PLAN = re.compile(r"\b(?:will|should)\b", re.I)
_LIST_LINE = re.compile(r"^\s*(?:[*\-\u2022]\s*|\d+[.)]\s*)?(?:pair\s*|caption\s*)?#\s*(\d+)\s*[:.)\-]?(.*)$",
                        re.I | re.M)
_LIST_LABEL = re.compile(r"\b(not hateful|not sarcastic|benign|hateful|sarcastic|sarcasm)\b", re.I)


@dataclass(frozen=True)
class Rules:
    """The parser's switches. Each is one way of reading an answer that the hand labels may or may not follow;
    the defaults are the choice of ``choose_rules`` on the development groups (see the module docstring): a
    switch the development answers give no evidence for stays off (ties go to the simplest rule set).

    Attributes:
        opening: ``formatted`` when the verdict starts within this many characters of the reply.
        cut_turns: read the reply only up to the model's next ``User:``/``System:`` turn.
        reply_after_user_turn: a reply that opens by writing a ``User:`` turn is read from the ``System:``
            turn that follows it; with none, the model never answered (non-functional).
        ignore_plans: a sentence with "will"/"should" states a plan ("I will select ..."), not a verdict.
        reject_roleplay: a reply opening with ``*`` or ``###`` plays out a dialogue: non-functional.
        per_pair_list: lines "#k: <label>" label each listed pair (benign, hateful, sarcastic).
        out_of_range_functional: a named pair the prompt does not have: functional, no pair marked (else
            non-functional).
        sarcasm_is_label: the word "sarcasm" counts as the label sarcastic (else it is no valid label:
            functional, no pair marked).
        loose_benign: "the pairs are all benign", "none of them contain hateful ..." also say all are benign.
    """

    opening: int = 100
    cut_turns: bool = False
    reply_after_user_turn: bool = False
    ignore_plans: bool = True
    reject_roleplay: bool = True
    per_pair_list: bool = True
    out_of_range_functional: bool = False
    sarcasm_is_label: bool = False
    loose_benign: bool = True


SWITCHES = tuple(f.name for f in fields(Rules) if f.type in (bool, "bool"))
OPENINGS = (40, 60, 80, 100, 120, 130, 140, 160, 200, 300)


@dataclass(frozen=True)
class Verdict:
    """What one answer says: ``pairs`` maps each pair it names to "hateful", "sarcastic" or "benign";
    ``others_benign``: pairs it does not name are benign (False when it names no valid verdict at all).
    ``start``: where the verdict begins in the reply (characters), None when non-functional."""

    functional: bool
    formatted: bool
    pairs: tuple[tuple[int, str], ...] = ()
    others_benign: bool = False
    start: int | None = None

    def label(self, pair: int) -> str | None:
        """The verdict on one pair (0-based, as the prompt numbers them), None when there is none."""
        if not self.functional:
            return None
        named = dict(self.pairs)
        return named.get(pair, "benign" if self.others_benign else None)


_NONE = Verdict(False, False)


def first_turn(answer: object, rules: Rules = Rules()) -> str:
    """The model's own reply: text before it starts the next ``User:``/``System:`` turn."""
    if not isinstance(answer, str):
        return ""
    text = answer.strip()
    if rules.reply_after_user_turn and re.match(r"User\s*:", text, re.I):
        match = _LEADING_USER.match(text)
        if match is None:  # the model wrote the user's turn and no reply
            return ""
        text = text[match.end():].strip()
    if not rules.cut_turns:
        return text
    match = _TURN.search(text)
    return text[: match.start()] if match else text


def _sentence(text: str, pos: int) -> str:
    start = max(text.rfind(c, 0, pos) for c in ".!?\n") + 1
    ends = [i for i in (text.find(c, pos) for c in ".!?\n") if i >= 0]
    return text[start: min(ends) if ends else len(text)]


def _blank_echo(text: str) -> str:
    """The prompt's own "hateful or sarcastic" blanked out (same length): an echo of the task is no label."""
    return _ECHO.sub(lambda m: " " * len(m.group(0)), text)


def _first(pattern: re.Pattern, text: str, rules: Rules) -> re.Match | None:
    """First match that states a verdict, not a plan ("I will select the most likely pair ...")."""
    for match in pattern.finditer(text):
        if not (rules.ignore_plans and _PLAN.search(_sentence(text, match.start()))):
            return match
    return None


def _label_word(word: str, rules: Rules) -> str | None:
    word = word.lower()
    if word == "sarcasm":
        return "sarcastic" if rules.sarcasm_is_label else None
    return "sarcastic" if word.startswith("sarcas") else "hateful"


def _listing(text: str, rules: Rules) -> tuple[int, dict[int, str]] | None:
    """Lines "#k: ... <label>" that label pairs one by one: (offset of the first, pair -> label)."""
    found: dict[int, str] = {}
    first = None
    for match in _LIST_LINE.finditer(text):
        rest = match.group(2)
        if "image: '" in rest:  # a restated pair: only what follows its fields is the model's word
            rest = rest[rest.rfind("'") + 1:]
        label = _LIST_LABEL.search(rest)
        if label is not None and not label.group(1).lower().startswith("not"):  # "not hateful or sarcastic": benign
            label = _LIST_LABEL.search(_blank_echo(rest))  # "likelihood of being hateful or sarcastic: 0.8": none
        if label is None:
            continue
        word = label.group(1).lower()
        name = "benign" if word.startswith(("not", "benign")) else _label_word(word, rules)
        if name is None:
            continue
        found.setdefault(int(match.group(1)), name)
        first = match.start() + match.group(0).index("#") if first is None else first
    return (first, found) if len(found) >= 2 else None


def parse_answer(answer: object, n_pairs: int | None = None, rules: Rules = Rules()) -> Verdict:
    """Verdict of one answer; ``n_pairs`` (when known) flags pair numbers outside the prompt."""
    text = first_turn(answer, rules)
    if rules.reject_roleplay and text.lstrip().startswith(("*", "###")):  # role play of the dialogue
        return _NONE
    lead = len(text) - len(text.lstrip())

    def verdict(start: int, pairs: dict[int, str], others_benign: bool = True) -> Verdict:
        offset = start - lead
        if n_pairs is not None and any(not 0 <= p < n_pairs for p in pairs):
            if not rules.out_of_range_functional:
                return _NONE
            return Verdict(True, offset < rules.opening, (), False, offset)
        return Verdict(True, offset < rules.opening, tuple(sorted(pairs.items())), others_benign, offset)

    benign = _first(_BENIGN, text, rules)
    if rules.loose_benign:
        loose = _first(_LOOSE_BENIGN, text, rules)
        if loose and (benign is None or loose.start() < benign.start()):
            benign = loose
    pair = _first(_PAIR, text, rules)
    listing = _listing(text, rules) if rules.per_pair_list else None
    starts = [m.start() for m in (benign, pair) if m is not None]
    if listing and (not starts or listing[0] <= min(starts)):
        return verdict(listing[0], listing[1])
    if benign and (pair is None or benign.start() < pair.start()):
        return verdict(benign.start(), {})
    if pair is None:
        return _NONE
    if pair.group(1):
        named = [int(pair.group(1))] + [int(n) for n in _MORE.findall(pair.group(2) or "")]
    else:
        named = [_ORDINAL[pair.group(3).lower()]]
    plain = _blank_echo(text)
    label = _LABEL.search(plain, pair.end()) or _LABEL.search(plain)
    if label is None:
        return _NONE
    name = _label_word(label.group(1), rules)
    if name is None:  # a label outside the asked two: the model answered, but names no valid verdict
        return Verdict(True, pair.start() - lead < rules.opening, (), False, pair.start() - lead)
    return verdict(pair.start(), {p: name for p in named})


def _reply(answer: object, prompt: object) -> object:
    """A generated text that starts by echoing its prompt (as the published ``generated_text``) -> the reply."""
    if isinstance(answer, str) and isinstance(prompt, str) and prompt and answer.startswith(prompt):
        return answer[len(prompt):]
    return answer


def verdict_columns(verdicts: Sequence[Verdict], pairs: Iterable[object]) -> dict[str, list[int]]:
    """Per answer row (one pair each): the five ``parsed_is_*`` values of that row's pair."""
    out: dict[str, list[int]] = {f: [] for f in FIELDS}
    for v, pair in zip(verdicts, pairs):
        try:
            label = v.label(int(pair))
        except (TypeError, ValueError):
            label = None
        out["functional"].append(int(v.functional))
        out["formatted"].append(int(v.formatted))
        out["hateful"].append(int(label == "hateful"))
        out["sarcastic"].append(int(label == "sarcastic"))
        out["benign"].append(int(label == "benign"))
    return out


def parse_table(answers: pd.DataFrame, column: str | None = None, rules: Rules = Rules()) -> pd.DataFrame:
    """Add ``parsed_is_*`` columns to an answers table (one row per target group, shot count and pair).

    ``column``: the answer text column; default ``extracted_info`` when present, else ``generated_text``
    (a text that starts with the row's ``prompt`` is read after it). ``ans_num``: the row's pair, numbered
    as the prompt numbers them (#0 first). A run's per-prompt output is expanded first (``expand_answers``).
    """
    if "ans_num" not in answers and "member_ids" in answers:
        from memefx.icl.answers import expand_answers

        answers = expand_answers(answers, column or "generated_text")
    column = column or ("extracted_info" if "extracted_info" in answers else "generated_text")
    missing = [c for c in (column, "ans_num") if c not in answers]
    if missing:
        raise ValueError(f"answers table lacks columns {missing} (has {list(answers.columns)}); give the "
                         "published answer file or the output of memefx icl run")
    out = answers.copy()
    prompts = out["prompt"] if "prompt" in out else pd.Series([None] * len(out), index=out.index)
    cache: dict[tuple[object, object], Verdict] = {}
    verdicts = []
    for answer, prompt in zip(out[column], prompts):
        key = (answer if isinstance(answer, str) else None, prompt if isinstance(prompt, str) else None)
        if key not in cache:
            cache[key] = parse_answer(_reply(answer, prompt), pairs_in_prompt(prompt), rules)
        verdicts.append(cache[key])
    for name, values in verdict_columns(verdicts, out["ans_num"]).items():
        out[f"parsed_is_{name}"] = values
    out["parsed_is_hateful_or_sarcastic"] = (out.parsed_is_hateful | out.parsed_is_sarcastic).astype(int)
    return out


# --------------------------------------------------------------------- development and held-out hand labels
HOLDOUT_SALT = "memefx-parser-holdout:"


def _group_key(group: object) -> str:
    """A target group id as memefx writes it: 5 digits (the published file writes 1456 for 01456)."""
    if isinstance(group, float) and group.is_integer():
        group = int(group)
    text = str(group).strip()
    return text.zfill(5) if text.isdigit() else text


def is_held_out(group: object) -> bool:
    """Whether a labelled target group belongs to the held-out part of the hand labels.

    Fixed before any rule was chosen or written, by the group id alone: SHA-256 of ``HOLDOUT_SALT`` + the
    5-digit id, its first 8 hex digits as an integer, modulo 3 == 0 -> held out. On ``llm_answers.csv``:
    31 of 65 groups, 329 of 681 rows (the first rule written down, kept although it holds out more than a
    third). A new labelled group falls on one side by the same rule, whatever else the file holds."""
    digest = hashlib.sha256((HOLDOUT_SALT + _group_key(group)).encode()).hexdigest()
    return int(digest[:8], 16) % 3 == 0


def split_labelled(answers: pd.DataFrame, group_column: str = "image_id") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(development, held-out) rows of a hand-labelled answer table, split by target group (``is_held_out``).

    Rules are written and chosen on the development part only; the held-out part only scores them."""
    held = answers[group_column].map(is_held_out).astype(bool)
    return answers[~held], answers[held]


def parser_inputs(answers: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """Per row, what the parser reads: ``reply`` (the answer after its echoed prompt), ``n_pairs`` (member
    lines of the prompt's target block) and ``pair`` (``ans_num``). Rows equal here get the same verdict."""
    column = column or ("extracted_info" if "extracted_info" in answers else "generated_text")
    prompts = answers["prompt"] if "prompt" in answers else pd.Series([None] * len(answers), index=answers.index)
    replies = [r if isinstance(r, str) else "" for r in map(_reply, answers[column], prompts)]
    return pd.DataFrame({"reply": replies, "n_pairs": [pairs_in_prompt(p) for p in prompts],
                         "pair": answers["ans_num"].to_numpy()}, index=answers.index)


def label_ceiling(answers: pd.DataFrame, keys: pd.DataFrame) -> dict[str, tuple[int, float]]:
    """Per field: (number of distinct ``keys`` whose rows carry different hand labels, the highest agreement
    any function of ``keys`` can reach: each key's majority label, over all rows)."""
    out = {}
    for f in FIELDS:
        labels = answers[f"is_{f}"].astype(int)
        grouped = labels.groupby([keys[c] for c in keys.columns], dropna=False)
        clashes = int((grouped.nunique() > 1).sum())
        best = int(grouped.agg(lambda v: v.value_counts().iloc[0]).sum())
        out[f] = (clashes, best / len(answers) if len(answers) else float("nan"))
    return out


# ------------------------------------------------------------------------------------- choosing the rules

def rule_grid(openings: Sequence[int] = OPENINGS) -> list[Rules]:
    """Every combination of the switches and the ``opening`` thresholds, simplest first (fewest switches on)."""
    combos = sorted(itertools.product((False, True), repeat=len(SWITCHES)), key=lambda c: (sum(c), c))
    return [Rules(opening=o, **dict(zip(SWITCHES, c))) for c in combos for o in openings]


def agreement_matrix(answers: pd.DataFrame, grid: Sequence[Rules], column: str | None = None) -> pd.DataFrame:
    """For every rule set of ``grid`` (columns, by position) and field: 1 where the parsed value of a row
    equals its hand label. Rows: ``answers`` rows; columns: MultiIndex (rule index, field).

    Answers are parsed once per combination of switches; the ``opening`` threshold only moves ``formatted``."""
    import numpy as np

    column = column or ("extracted_info" if "extracted_info" in answers else "generated_text")
    hand = {f: answers[f"is_{f}"].astype(int).to_numpy() for f in FIELDS}
    prompts = answers["prompt"].tolist() if "prompt" in answers else [None] * len(answers)
    n_pairs = [pairs_in_prompt(p) for p in prompts]
    texts = [_reply(a, p) for a, p in zip(answers[column], prompts)]
    columns: dict[tuple[int, str], np.ndarray] = {}
    parsed: dict[tuple, dict[str, np.ndarray]] = {}
    for index, rules in enumerate(grid):
        switches = tuple(getattr(rules, s) for s in SWITCHES)
        if switches not in parsed:
            base = replace(rules, opening=10**9)
            memo: dict[tuple[object, object], Verdict] = {}
            verdicts = [memo[(t, n)] if (t, n) in memo else memo.setdefault((t, n), parse_answer(t, n, base))
                        for t, n in zip((t if isinstance(t, str) else None for t in texts), n_pairs)]
            values = {f: np.asarray(v) for f, v in verdict_columns(verdicts, answers["ans_num"]).items()}
            values["start"] = np.asarray([v.start if v.start is not None else 10**9 for v in verdicts])
            parsed[switches] = values
        values = parsed[switches]
        formatted = (values["functional"] == 1) & (values["start"] < rules.opening)
        for f in FIELDS:
            mine = formatted.astype(int) if f == "formatted" else values[f]
            columns[(index, f)] = (mine == hand[f]).astype(np.int8)
    matrix = pd.DataFrame(columns, index=answers.index)
    matrix.columns = pd.MultiIndex.from_tuples(matrix.columns, names=["rules", "field"])
    return matrix


def choose_rules(matrix: pd.DataFrame, rows: Sequence[bool] | None = None) -> int:
    """Index of the rule set with the best mean agreement over the five fields on ``rows`` (default all);
    ties go to the simplest (first in ``rule_grid`` order)."""
    chosen = matrix if rows is None else matrix[pd.Series(list(rows), index=matrix.index)]
    score = chosen.mean().groupby(level="rules").mean()
    return int(score.idxmax())  # idxmax returns the first of equal maxima
