"""LLM inference for in-context evaluation: batched generation and label scoring, cached per prompt.

Every result is appended to ``<cache>/rank<r>.jsonl`` as soon as its batch is done, keyed by a hash of
(model, mode, settings, prompt), so a killed run resumes without losing or repeating a row, on any
number of processes: under ``torchrun`` each rank takes every world_size-th missing prompt, and rank 0
merges all shards into one table. Models load from a local path (or the local HF cache) only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """Model and decoding settings; every field enters the cache key."""

    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantize: Literal["nf4", "int8"] | None = None
    batch_size: int = 8
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def cache_key(cfg: EngineConfig, mode: str, prompt: str, continuations: tuple[str, ...] = ()) -> str:
    payload = json.dumps({"cfg": asdict(cfg), "mode": mode, "prompt": prompt, "cont": list(continuations)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load(cfg: EngineConfig):
    """(model, tokenizer) in eval mode; tokenizer pads on the left; nf4/int8 through bitsandbytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True, "dtype": DTYPES[cfg.dtype]}
    if cfg.quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[cfg.dtype])
            if cfg.quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


def _encode(tok, texts: list[str], device) -> dict:
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def generate(model, tok, prompts: list[str], cfg: EngineConfig, keys: list[str]) -> list[str]:
    """Continuations of a batch of prompts. Greedy decoding is batched; sampled decoding runs one prompt
    at a time with a seed derived from its cache key, so the text does not depend on batch composition."""
    if cfg.do_sample:
        out = []
        for prompt, key in zip(prompts, keys):
            torch.manual_seed(cfg.seed + int(key[:12], 16))
            out += _generate(model, tok, [prompt], cfg)
        return out
    return _generate(model, tok, prompts, cfg)


def _generate(model, tok, prompts: list[str], cfg: EngineConfig) -> list[str]:
    enc = _encode(tok, prompts, model.device)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else {"do_sample": False}
    ids = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def score(model, tok, prompts: list[str], continuations: tuple[str, ...]) -> list[list[float]]:
    """Per prompt, the summed log-probability of each continuation (one forward for all pairs)."""
    texts, spans = [], []
    for prompt in prompts:
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        for cont in continuations:
            full = tok(prompt + cont, add_special_tokens=False)["input_ids"]
            if len(full) <= n_prompt:
                raise ValueError(f"continuation {cont!r} adds no token to the prompt")
            texts.append(prompt + cont)
            spans.append(len(full) - n_prompt)
    enc = _encode(tok, texts, model.device)
    logprobs = model(**enc).logits.float().log_softmax(-1)
    ids = enc["input_ids"]
    out = []
    for row, n_cont in enumerate(spans):
        targets = ids[row, -n_cont:]
        predicted = logprobs[row, -n_cont - 1:-1].gather(1, targets[:, None]).squeeze(1)
        out.append(float(predicted.sum()))
    k = len(continuations)
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


class ResultCache:
    """Append-only jsonl shards, one per rank; a result is written once its batch is complete."""

    def __init__(self, folder: str | Path, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rank{rank}.jsonl"

    def load(self) -> dict[str, dict]:
        done = {}
        for shard in sorted(self.folder.glob("rank*.jsonl")):
            for line in shard.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: its prompt is simply redone
                    continue
                done[row["key"]] = row
        return done

    def append(self, rows: list[dict]) -> None:
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a kill cut the last line: start on a fresh one
        with open(self.path, "a") as f:
            if torn:
                f.write("\n")
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run(prompts: pd.DataFrame, cfg: EngineConfig, cache: str | Path, mode: Literal["generate", "score"] = "generate",
        continuations: tuple[str, ...] = (" benign", " hateful"), rank: int = 0, world_size: int = 1,
        model=None, tok=None, limit: int | None = None) -> pd.DataFrame | None:
    """Answer every row of ``prompts`` (a ``prompt`` column plus any others, kept); return the merged
    table on rank 0 (None on other ranks). ``limit`` stops after that many new prompts (tests of resume)."""
    if "prompt" not in prompts:
        raise ValueError(f"prompts table needs a 'prompt' column (has {list(prompts.columns)})")
    store = ResultCache(cache, rank)
    keys = [cache_key(cfg, mode, p, continuations if mode == "score" else ()) for p in prompts.prompt]
    unique = list(dict.fromkeys(keys))
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    done = store.load()
    mine = [k for k in unique if k not in done][rank::world_size][:limit]
    if mine and model is None:
        model, tok = load(cfg)
    from rich.progress import track

    starts = range(0, len(mine), cfg.batch_size)
    for start in track(starts, description=f"rank {rank}: {mode} {len(mine)} prompts", disable=not mine,
                       transient=True):
        batch_keys = mine[start:start + cfg.batch_size]
        texts = [prompts.prompt.iloc[first[k]] for k in batch_keys]
        if mode == "generate":
            results = [{"key": k, "generated_text": g} for k, g in zip(batch_keys, generate(model, tok, texts, cfg, batch_keys))]
        else:
            results = [{"key": k, **{f"logprob_{c.strip() or i}": v for i, (c, v) in enumerate(zip(continuations, lp))}}
                       for k, lp in zip(batch_keys, score(model, tok, texts, continuations))]
        store.append(results)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    done = store.load()
    missing = [k for k in unique if k not in done]
    if missing and limit is None:
        raise RuntimeError(f"{len(missing)} prompts have no result in {cache}: rerun to complete them")
    rows = [done.get(k, {}) for k in keys]
    result = pd.DataFrame(rows, index=prompts.index).drop(columns=["key"], errors="ignore")
    if mode == "score" and {"logprob_benign", "logprob_hateful"} <= set(result.columns):
        pair = torch.tensor(result[["logprob_benign", "logprob_hateful"]].to_numpy(dtype=float))
        result["p_hateful"] = pair.softmax(-1)[:, 1].numpy()  # a continuous score for AUROC and miATE
    return pd.concat([prompts, result], axis=1)
