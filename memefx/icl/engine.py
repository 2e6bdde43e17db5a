"""LLM inference for in-context evaluation: batched generation and label scoring, cached per prompt.

Every result is appended to ``<cache>/rank<r>.jsonl`` as soon as its batch is done, keyed by a hash of
(model fingerprint, mode, settings, prompt), so a killed run resumes without losing or repeating a row, on
any number of processes. Under ``torchrun`` the full list of prompt keys is sharded by rank first and each
rank then skips what the cache already holds, so ranks that read the cache at different times still cover
every prompt exactly once; rank 0 merges all shards into one table.

The pieces live in ``llm`` (settings, model identity, loading), ``answer_cache`` and ``decoding``; this
module runs them over a prompt table. Score mode runs each prompt once: one forward over the prompt
(logits kept at its last position only) yields the first token of every label continuation, and the
remaining continuation tokens, if any, are scored on the prompt's key/value cache. Batches hold prompts of similar token counts (sorted by length),
and results are put back in the table's order by key. Models load from a local folder, or from the local
Hugging Face cache for a hub id, never from the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from memefx.errors import UserError  # noqa: F401  (the one user-error class of memefx, re-exported)
from memefx.icl.answer_cache import ResultCache, _answer_check, _logprob_column, cache_key  # noqa: F401
from memefx.icl.decoding import (  # noqa: F401  (re-exported: the names callers import from here)
    check_room,
    encode_continuations,
    encode_prompt,
    generate,
    generate_ids,
    length_batches,
    score,
    score_ids,
)
from memefx.icl.llm import DTYPES, EngineConfig, EngineStats, load, model_fingerprint, resolve_model  # noqa: F401


# --------------------------------------------------------------------------------------------------------- run
def run(prompts: pd.DataFrame, cfg: EngineConfig, cache: str | Path, mode: Literal["generate", "score"] = "generate",
        continuations: Sequence[str] = (" benign", " hateful"), rank: int = 0, world_size: int = 1,
        model=None, tok=None, limit: int | None = None, stats: EngineStats | None = None,
        fingerprint: str | None = None) -> pd.DataFrame | None:
    """Answer every row of ``prompts`` (a ``prompt`` column plus any others, carried through); return the
    merged table on rank 0 (None on other ranks).

    Ranks take every ``world_size``-th key of the full, de-duplicated key list, then skip those cached.
    ``limit`` stops after that many new prompts (tests of resume); ``stats`` accumulates token counts."""
    if "prompt" not in prompts:
        raise UserError(f"prompts table needs a 'prompt' column (has {list(prompts.columns)})")
    bad = [i for i, p in zip(prompts.index, prompts.prompt) if not isinstance(p, str) or not p]
    if bad:
        raise UserError(f"prompts table: {len(bad)} rows have no prompt text (first row index {bad[0]})")
    if mode not in ("generate", "score"):
        raise UserError(f"mode must be 'generate' or 'score', not {mode!r}")
    continuations = tuple(continuations) if mode == "score" else ()
    fingerprint = fingerprint or model_fingerprint(cfg.model)
    keys = [cache_key(cfg, mode, p, continuations, fingerprint) for p in prompts.prompt]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    shard = list(first)[rank::world_size]  # by rank first: independent of what any rank has cached
    store = ResultCache(cache, rank, _answer_check(mode, continuations))
    done = store.load()
    todo = [k for k in shard if k not in done][:limit]
    if todo and model is None:
        model, tok = load(cfg)
    texts = [prompts.prompt.iloc[first[k]] for k in todo]
    ids = [encode_prompt(tok, t, cfg.add_bos) for t in texts] if todo else []
    conts = [encode_continuations(tok, t, continuations) for t in texts] if todo and mode == "score" else []
    if mode == "generate":  # every prompt checked before the first answer is written
        check_room(cfg, [len(i) for i in ids], lambda i: f"prompt table row {prompts.index[first[todo[i]]]!r}")
    from rich.progress import track

    for batch in track(length_batches([len(i) for i in ids], cfg.batch_size),
                       description=f"rank {rank}: {mode} {len(todo)} prompts", disable=not todo, transient=True):
        batch_keys = [todo[i] for i in batch]
        if mode == "generate":
            answers = generate_ids(model, tok, [ids[i] for i in batch], cfg, batch_keys, stats)
            results = [{"key": k, "generated_text": g} for k, g in zip(batch_keys, answers)]
        else:
            lps = score_ids(model, [ids[i] for i in batch], [conts[i] for i in batch], tok.pad_token_id, stats)
            results = [{"key": k, **{_logprob_column(c, j): v for j, (c, v) in enumerate(zip(continuations, lp))}}
                       for k, lp in zip(batch_keys, lps)]
        store.append(results)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    done = store.load()
    missing = [k for k in first if k not in done]
    if missing and limit is None:
        raise RuntimeError(f"{len(missing)} prompts have no result in {cache}: rerun the same command to complete them")
    rows = [done.get(k, {}) for k in keys]
    result = pd.DataFrame(rows, index=prompts.index).drop(columns=["key"], errors="ignore")
    prompts = prompts.drop(columns=[c for c in result.columns if c in prompts.columns])  # fresh answers win
    if mode == "score" and {"logprob_benign", "logprob_hateful"} <= set(result.columns):
        pair = torch.tensor(result[["logprob_benign", "logprob_hateful"]].to_numpy(dtype=float, copy=True))  # any column order
        result["p_hateful"] = pair.softmax(-1)[:, 1].numpy()  # a continuous score for AUROC and miATE
    return pd.concat([prompts, result], axis=1)
