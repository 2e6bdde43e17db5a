"""Decoding: prompts and label continuations to token ids, batched label scoring (one forward per prompt,
the rest of a multi-token continuation on its key/value cache) and batched generation (left-padded,
prompts of similar lengths together, each answer seeded by its key when sampling)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from memefx.errors import UserError  # the one user-error class of memefx (exit 2)
from memefx.icl.llm import EngineConfig, EngineStats


# ------------------------------------------------------------------------------------------------ tokenization
def encode_prompt(tok, prompt: str, add_bos: bool = True) -> list[int]:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    bos = getattr(tok, "bos_token_id", None)
    return [bos, *ids] if add_bos and bos is not None else list(ids)


def encode_continuations(tok, prompt: str, continuations: Sequence[str]) -> list[list[int]]:
    """Tokens each continuation adds after the prompt, as the tokenizer splits the joined text."""
    n_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for cont in continuations:
        if prompt[-1:] and not prompt[-1].isspace() and not cont[:1].isspace():
            raise UserError(f"continuation {cont!r} would be scored glued to the prompt's end ({prompt[-20:] + cont!r}): "
                            f"start it with a space ({' ' + cont!r}), as the answer would be written")
        full = tok(prompt + cont, add_special_tokens=False)["input_ids"]
        if len(full) <= len(n_prompt) or full[:len(n_prompt)] != n_prompt:
            raise UserError(f"continuation {cont!r} does not extend the prompt's tokens (it adds none or merges "
                            f"with the prompt's last token, prompt ends {prompt[-40:]!r}): start it with a space")
        out.append(list(full[len(n_prompt):]))
    return out


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _cache_arg(model) -> str:
    """Name of the key/value-cache argument (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _count(stats: EngineStats | None, mask: torch.Tensor) -> None:
    if stats is not None:
        real = int(mask.sum())
        stats.forwarded_tokens += real
        stats.padded_positions += mask.numel() - real
        stats.forwards += 1


# ----------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_ids(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]], pad_id: int,
              stats: EngineStats | None = None) -> list[list[float]]:
    """Summed log-probability of each continuation after its prompt, all given as token ids.

    One forward over the left-padded prompts keeps logits at the last position only (the first token of
    every continuation); continuation tokens beyond the first are fed on the prompt's key/value cache, one
    short forward per continuation, the cache cropped back to the prompt after each."""
    device = model.device
    ids, mask = _left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = _cache_arg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    _count(stats, mask)
    if stats is not None:
        stats.prompt_tokens += sum(len(p) for p in prompts)
    first = out.logits[:, -1].float().log_softmax(-1)
    kv = getattr(out, "cache", None)
    kv = getattr(out, "past_key_values", None) if kv is None else kv
    n_cont = len(continuations[0])
    scores = [[float(first[i, c[0]]) for c in conts] for i, conts in enumerate(continuations)]
    lengths = mask.sum(-1)
    for j in range(n_cont):
        rest = [conts[j][:-1] for conts in continuations]  # inputs predicting tokens 2..n of continuation j
        steps = max(len(r) for r in rest)
        if steps == 0:
            continue
        step_ids = torch.full((len(prompts), steps), pad_id, dtype=torch.long)
        step_mask = torch.zeros((len(prompts), steps), dtype=torch.long)
        for i, r in enumerate(rest):
            if r:
                step_ids[i, :len(r)] = torch.tensor(r)
                step_mask[i, :len(r)] = 1
        step_ids, step_mask = step_ids.to(device), step_mask.to(device)
        step_pos = lengths[:, None] + torch.arange(steps, device=device)[None]
        logits = model(input_ids=step_ids, attention_mask=torch.cat([mask, step_mask], 1), position_ids=step_pos,
                       use_cache=True, **{cache_arg: kv}).logits.float().log_softmax(-1)
        _count(stats, step_mask)
        kv.crop(-steps)  # back to the prompt (a negative count removes that many positions in every version)
        for i, conts in enumerate(continuations):
            targets = conts[j][1:]
            for t, token in enumerate(targets):
                scores[i][j] += float(logits[i, t, token])
    return scores


def score(model, tok, prompts: list[str], continuations: Sequence[str], add_bos: bool = True,
          stats: EngineStats | None = None) -> list[list[float]]:
    """Per prompt, the summed log-probability of each continuation (one prompt forward for all of them)."""
    ids = [encode_prompt(tok, p, add_bos) for p in prompts]
    conts = [encode_continuations(tok, p, continuations) for p in prompts]
    return score_ids(model, ids, conts, tok.pad_token_id, stats)


# -------------------------------------------------------------------------------------------------- generation
def check_room(cfg: EngineConfig, lengths: Sequence[int], where: Callable[[int], str] = str) -> None:
    """Refuse prompts that leave no room for an answer under ``max_length`` (``where(i)`` names prompt i),
    before anything is generated: transformers would warn and still emit a token past the limit."""
    full = [i for i, n in enumerate(lengths) if cfg.new_tokens(n) < 1]
    if full:
        i = full[0]
        raise UserError(f"{len(full)} prompt(s) have no room for an answer under engine.max_length="
                        f"{cfg.max_length}: {where(i)} has {lengths[i]} tokens; raise max_length or drop the "
                        "longer prompts (the published run dropped prompts over 2,000 characters)")


@torch.no_grad()
def generate_ids(model, tok, prompts: Sequence[Sequence[int]], cfg: EngineConfig, keys: Sequence[str],
                 stats: EngineStats | None = None) -> list[str]:
    """Continuations of a batch of tokenized prompts. Greedy decoding is batched; sampled decoding runs one
    prompt at a time with a seed derived from its cache key, so the text does not depend on the batch.
    Each answer gets ``cfg.new_tokens(len(prompt))`` tokens at most, batched or not."""
    check_room(cfg, [len(p) for p in prompts], lambda i: f"prompt {i} of the batch (key {keys[i][:12]})")
    if cfg.do_sample:
        out = []
        for prompt, key in zip(prompts, keys):
            torch.manual_seed(cfg.seed + int(key[:12], 16))
            out += _generate(model, tok, [prompt], cfg, stats)
        return out
    return _generate(model, tok, prompts, cfg, stats)


def _generate(model, tok, prompts: Sequence[Sequence[int]], cfg: EngineConfig, stats: EngineStats | None) -> list[str]:
    """One ``generate`` call over left-padded prompts. The sampling settings are passed explicitly, so the
    model folder's generation_config.json cannot replace them (anything else it sets enters the cache key
    with the model's fingerprint). A batch runs to its longest allowance and each row is cut to its own
    (rows of a greedy batch are independent)."""
    ids, mask = _left_pad(prompts, tok.pad_token_id, model.device)
    _count(stats, mask)
    if stats is not None:
        stats.prompt_tokens += sum(len(p) for p in prompts)
    room = [cfg.new_tokens(len(p)) for p in prompts]
    sampling = ({"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
                if cfg.do_sample else {"do_sample": False})
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(room),
                         pad_token_id=tok.pad_token_id, **sampling)
    return tok.batch_decode([row[ids.shape[1]:ids.shape[1] + n] for row, n in zip(out, room)],
                            skip_special_tokens=True)


def generate(model, tok, prompts: list[str], cfg: EngineConfig, keys: list[str]) -> list[str]:
    """Continuations of a batch of prompt texts (see ``generate_ids``)."""
    return generate_ids(model, tok, [encode_prompt(tok, p, cfg.add_bos) for p in prompts], cfg, keys)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length: sorted by length (stable), cut every ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
