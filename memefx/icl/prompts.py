"""Prompts for in-context evaluation (SPEC section 5): pair-selection prompt tables (memefx's layout, the
authors' procedure, the published replay), the per-meme prompt memefx adds, and a seeded demonstration
sampler. The prompt grammar itself (rendering, parsing, the pair line) lives in ``memefx.icl.grammar``.

"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

from memefx.icl.grammar import (  # noqa: F401  (re-exported: the names prompt users import from here)
    BENIGN_ANSWER,
    INSTRUCTION,
    PAIR_LINE,
    Block,
    Member,
    PromptInputError,
    clean_field,
    gold_answer,
    member_line,
    pair_prompt,
    pairs_in_prompt,
    parse_prompt,
    render,
)


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
    """memefx's own layout: one pair-selection prompt per (stratum, shot count), members sorted by id.

    ``members``: rows of one split and kind from ``strata_members`` (id, anchor, label). Demonstrations are
    other strata of the same table, drawn per target by ``sample_demonstrations``; with a ``budget``,
    ``cost`` measures a rendered prompt (e.g. its token count) and the last demonstrations are dropped until
    it fits. A prompt that then equals one already made for the same target (its shot count was also
    requested) is not repeated: each (group, few_shot_num) appears once; ``table.attrs['not_repeated']``
    counts those left out.
    """
    groups = {a: rows.sort_values("id") for a, rows in members.groupby("anchor")}

    def as_members(anchor: str) -> list[Member]:
        rows = groups[anchor]
        return [Member(texts[i], descriptions[i], int(lab)) for i, lab in zip(rows.id, rows.label)]

    out, repeats = [], 0
    for anchor in sorted(groups):
        target = as_members(anchor)
        made: set[int] = set()
        for k in sorted(shots):
            demos = sample_demonstrations(list(groups), anchor, k, seed)
            prompt = pair_prompt(target, [as_members(d) for d in demos])
            while budget is not None and cost is not None and demos and cost(prompt) > budget:
                demos = demos[:-1]
                prompt = pair_prompt(target, [as_members(d) for d in demos])
            if len(demos) in made:
                repeats += 1
                continue
            made.add(len(demos))
            out.append({"group": anchor, "few_shot_num": len(demos), "requested_shots": int(k), "prompt": prompt,
                        "member_ids": groups[anchor].id.astype(str).tolist(),
                        "member_labels": [m.label for m in target], "demo_groups": list(demos),
                        "gold_answer": gold_answer(target)})
    table = pd.DataFrame(out, columns=["group", "few_shot_num", "requested_shots", "prompt", "member_ids",
                                       "member_labels", "demo_groups", "gold_answer"])
    table.attrs["not_repeated"] = repeats  # (group, shots) whose trimmed prompt equals one already made
    return table


Layout = Literal["memefx", "published"]


def build_prompts(confounders: str | Path | None = None, captions: str | Path | None = None,
                  hmc: str | Path | None = None, split: str = "dev_seen", layout: Layout = "memefx",
                  kind: Literal["shared_image", "shared_text"] | None = None, from_published: str | Path | None = None,
                  shots: Sequence[int] = (0, 1, 2, 3, 4), seed: int | None = None, char_cap: int | None = None,
                  budget: int | None = None, tokenizer: str | None = None, per_meme: bool = False,
                  text_column: str | None = None, description_column: str = "text_captioned") -> pd.DataFrame:
    """The prompt table of ``memefx icl prompts``: every way of making prompts behind one signature.

    Args:
        confounders: confounder table (``confounders.parquet``); needed except for a replay, where it only
            separates memes that share text and description. The published layout and the replay read every
            row, exact duplicates included, as the authors' script did.
        captions: caption table (``hm_captions.parquet``) giving each image's description; the published
            layout also follows its row order, as the authors' script did.
        hmc: HMC folder; its ``<split>.jsonl`` gives each meme's overlaid text and label (the published
            layout takes labels from the confounder table, as the authors did). Without it (memefx layout
            only) the meme text comes from the caption-table column ``text_column``, which must be given.
        split: the split whose memes are prompted.
        layout: ``memefx`` (one kind of stratum, members sorted by id, seeded per-target sampler, optional
            token budget) or ``published`` (the authors' procedure, byte for byte on any split and seed: both
            kinds merged by anchor, their seeded shuffle and draw, prompts over ``char_cap`` characters dropped).
        kind: the stratum kind of the memefx layout (default ``shared_image``); the other ways of making
            prompts take both kinds, so giving it there is an error.
        from_published: the published answer file: replay its prompts exactly (give no ``layout``, ``seed``,
            ``char_cap``, ``budget`` or ``per_meme``: an option a way of making prompts does not use is an error).
        shots: shot counts k to build.
        seed: memefx layout default 0; published layout default 1987 (the published run's seed: it rebuilds
            every published prompt).
        char_cap: published layout: drop prompts longer than this many characters (default 2000).
        budget: memefx layout: token budget per prompt (needs ``tokenizer``); demonstrations are dropped to fit.
        tokenizer: local tokenizer folder measuring ``budget``.
        per_meme: one per-meme prompt (``id, group, label, prompt``) per stratum member (both kinds) instead.
        text_column: without ``hmc``: the caption-table column holding each meme's overlaid text (no default:
            the BLIP-2 columns of ``hm_captions.parquet``, ``text`` included, describe the image and are refused).
        description_column: caption-table column giving each image's description.

    Every table has ``group, few_shot_num, prompt, member_ids, member_labels`` (per-meme: ``id, group,
    label, prompt``); the published layout adds ``group_dir`` (the authors' folder name of the target);
    a replay adds ``rebuilt`` and ``unmapped`` (pairs that could not be mapped, listed).
    """
    from memefx.data.hmc import read_hmc
    from memefx.data.tables import read_captions, read_confounders

    way = "--from-published" if from_published is not None else f"--layout {layout}"
    if per_meme and way == "--layout memefx":
        way = "--per-meme"  # one prompt per meme: no demonstrations, both stratum kinds
    unused = {"--from-published": {"--layout published": "x" if layout == "published" else None, "--seed": seed,
                                   "--char-cap": char_cap, "--budget": budget, "--tokenizer": tokenizer,
                                   "--per-meme": per_meme or None, "--kind": kind},
              "--layout published": {"--budget": budget, "--tokenizer": tokenizer, "--kind": kind},
              "--layout memefx": {"--char-cap": char_cap},
              "--per-meme": {"--char-cap": char_cap, "--budget": budget, "--tokenizer": tokenizer, "--kind": kind,
                             "--seed": seed}}.get(way, {})
    given = [flag for flag, value in unused.items() if value is not None]
    if given:  # an option that would change nothing is refused, never silently ignored
        raise PromptInputError(f"{', '.join(given)}: not used by {way} prompts (they would change nothing); "
                               "leave out what does not apply")
    if captions is None:
        raise PromptInputError("--captions (the caption table with image descriptions) is required")
    if hmc is not None and text_column is not None:
        raise PromptInputError("--text_column: not used with --hmc (the HMC files give the meme text); leave one out")
    if hmc is None and not (from_published is not None or layout == "published"):
        from memefx.data.tables import check_meme_text_column

        try:
            check_meme_text_column(text_column, captions, "--text_column", "--hmc DIR")
        except ValueError as err:
            raise PromptInputError(str(err)) from None
    caption_table = read_captions(captions, None if text_column is None else (text_column, description_column))
    if description_column not in caption_table:
        raise PromptInputError(f"{captions}: no column {description_column!r} (has {list(caption_table.columns)})")
    descriptions = dict(zip(caption_table.image_id, caption_table[description_column]))
    memes = None
    if hmc is not None:
        memes = read_hmc(hmc, [split], images=False)[split]
    authors = from_published is not None or layout == "published"  # the authors' prompts, exactly
    if authors and memes is None:
        raise PromptInputError("the published prompts use the memes' own text: give --hmc DIR "
                               f"(the HMC folder with {split}.jsonl)")
    conf = None
    if confounders is not None:  # the authors' procedure shuffles every row of the table, duplicates included
        from memefx.icl.published import read_confounder_rows

        conf = read_confounder_rows(confounders) if authors else read_confounders(confounders)
    texts = dict(zip(memes.id, memes.text)) if memes is not None else \
        dict(zip(caption_table.image_id, caption_table[text_column]))
    labels = dict(zip(memes.id, memes.label.astype(int))) if memes is not None else None

    if from_published is not None:
        from memefx.icl.published import replay_published

        path = Path(from_published)
        if not path.is_file():
            raise PromptInputError(f"published answer file {path} not found")
        from memefx.errors import UserError
        from memefx.table_io import read_table

        try:
            answers = read_table(path)
        except UserError as err:
            raise PromptInputError(f"not a readable answer table: {err}; expected the published answer CSV (prompts "
                                   "quoted) or a parquet file") from None
        return replay_published(answers, texts, descriptions, labels, conf, split, source=str(path))
    if conf is None:
        raise PromptInputError("--confounders is required to find the strata of a split")
    if layout == "published":
        from memefx.icl.published import PUBLISHED_CHAR_CAP, PUBLISHED_SEED, published_prompt_table

        if per_meme:
            raise PromptInputError("--per-meme prompts have one layout; leave out --layout published")
        return published_prompt_table(conf, split, texts, descriptions, tuple(int(k) for k in shots),
                                      PUBLISHED_SEED if seed is None else seed,
                                      PUBLISHED_CHAR_CAP if char_cap is None else char_cap)
    if layout != "memefx":
        raise PromptInputError(f"layout {layout!r} is not one of 'memefx', 'published'")

    from memefx.data.strata import strata_members

    members = strata_members(conf)
    kind = kind or "shared_image"
    # per-meme prompts cover every stratum member of the split, both kinds, as memefx miate reads predictions
    members = members[(members.split == split) & ((members.kind == kind) | per_meme)]
    if members.empty:
        raise PromptInputError(f"no {kind} strata in split {split!r}")
    if labels is not None:
        members = members.assign(label=[int(labels.get(i, lab)) for i, lab in zip(members.id, members.label)])
    from memefx.icl.published import _check_fields

    _check_fields(sorted(set(members.id)), texts, descriptions, f"split {split!r}: of its {kind} stratum members")
    if per_meme:
        rows = members.drop_duplicates("id")
        return pd.DataFrame({"id": rows.id.values, "group": rows.anchor.values, "label": rows.label.astype(int).values,
                             "prompt": [meme_prompt(texts[i], descriptions[i])[0] for i in rows.id]})
    cost = None
    if budget is not None:
        if not tokenizer:
            raise PromptInputError("--budget needs --tokenizer (a local tokenizer folder)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)

        def cost(prompt: str) -> int:
            return len(tok(prompt)["input_ids"])

    return build_prompt_table(members, texts, descriptions, tuple(int(k) for k in shots),
                              0 if seed is None else seed, budget, cost)
