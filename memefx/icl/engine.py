"""LLM inference for in-context evaluation: batched generation and label scoring, cached per prompt.

Every result is appended to ``<cache>/rank<r>.jsonl`` as soon as its batch is done, keyed by a hash of
(model fingerprint, mode, settings, prompt), so a killed run resumes without losing or repeating a row, on
any number of processes. Under ``torchrun`` the full list of prompt keys is sharded by rank first and each
rank then skips what the cache already holds, so ranks that read the cache at different times still cover
every prompt exactly once; rank 0 merges all shards into one table.

Score mode runs each prompt once: one forward over the prompt (logits kept at its last position only)
yields the first token of every label continuation, and the remaining continuation tokens, if any, are
scored on the prompt's key/value cache. Batches hold prompts of similar token counts (sorted by length),
and results are put back in the table's order by key. Models load from a local folder, or from the local
Hugging Face cache for a hub id, never from the network.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from memefx.errors import UserError  # the one user-error class of memefx (exit 2)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# settings that change how fast results come, never which results: kept out of the cache key
_NOT_IN_KEY = ("model", "batch_size")


@dataclass(frozen=True)
class EngineConfig:
    """Model and decoding settings. Every field but ``model`` and ``batch_size`` enters the answer-cache key
    (the model enters by its fingerprint), so a cached answer is never reused under other settings.

    Args:
        model: local folder of a Hugging Face causal LM, or a hub id already in the local HF cache
        dtype: weight and compute dtype
        quantize: bitsandbytes quantization of the linear layers (nf4 or int8), none by default
        batch_size: prompts per forward (results do not depend on it; it is not part of the cache key)
        max_new_tokens: generated tokens per answer at most (generate mode); None: only ``max_length`` limits
        max_length: tokens per sequence at most, prompt included (BOS too when added), as transformers'
            ``max_length``: an answer gets ``max_length`` minus its prompt's tokens (and at most
            ``max_new_tokens``); None: no total limit. A prompt that leaves no room is an error
        do_sample: seeded sampling instead of greedy decoding
        temperature: sampling temperature
        top_k: sample among the k most likely tokens only; 0 keeps every token (transformers' own
            default is 50, which memefx used implicitly before it became a setting)
        top_p: nucleus sampling mass
        seed: base seed of sampled decoding (combined with each prompt's key)
        add_bos: start every prompt with the tokenizer's BOS token when it has one (as Llama was trained;
            the published pipeline tokenised its prompts without it)
    """

    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantize: Literal["nf4", "int8"] | None = None
    batch_size: int = 8
    max_new_tokens: int | None = 64
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    add_bos: bool = True

    def __post_init__(self) -> None:
        problems = [f"{name}={value!r} must be a positive integer" for name, value in
                    (("max_new_tokens", self.max_new_tokens), ("max_length", self.max_length),
                     ("batch_size", self.batch_size))
                    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)]
        if self.max_new_tokens is None and self.max_length is None:
            problems.append("max_new_tokens and max_length are both None: give at least one, or answers never end")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} must be 0 (no cut) or a positive integer")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature!r} must be > 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if problems:
            raise UserError("engine settings: " + "; ".join(problems))

    def new_tokens(self, prompt_tokens: int) -> int:
        """How many tokens an answer to a prompt of ``prompt_tokens`` tokens may have (both limits applied)."""
        room = [n for n in (self.max_new_tokens,
                            None if self.max_length is None else self.max_length - prompt_tokens) if n is not None]
        return min(room)


@dataclass
class EngineStats:
    """Token accounting of the forwards run (the engine benchmark reads it)."""

    prompt_tokens: int = 0  # tokens of the prompts themselves
    forwarded_tokens: int = 0  # non-padding tokens fed to the model
    padded_positions: int = 0  # padding positions fed to the model
    forwards: int = 0

    @property
    def padding_fraction(self) -> float:
        total = self.forwarded_tokens + self.padded_positions
        return self.padded_positions / total if total else 0.0


# ---------------------------------------------------------------------------------------------- model identity
def resolve_model(name: str) -> Path:
    """The local folder of ``name``: a folder as given, or the snapshot of a hub id in the local HF cache.

    Never touches the network; raises ``UserError`` naming what was looked for."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if not looks_like_path:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            pass
    raise UserError(f"no model folder {name!r} (and no copy of a hub id {name!r} in the local Hugging Face cache): "
                    "pass the folder that holds config.json and the weights; memefx never downloads models")


def model_fingerprint(name: str) -> str:
    """A hash of the model's weights and tokenizer, so cached answers follow the model, not its path.

    Small files (config, tokenizer, weight index) are hashed whole. A weight file in the HF cache is a link
    to a blob named by its content hash, used as is; any other large file enters by size, modification
    time and the hash of its first and last MiB (rewritten weights change the mtime; a copy recomputes)."""
    folder = resolve_model(name)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(folder).as_posix()
        real = path.resolve()
        size = real.stat().st_size
        if size <= 8 << 20:
            ident = hashlib.sha256(real.read_bytes()).hexdigest()
        elif path.is_symlink() and real.parent.name == "blobs":
            ident = f"blob:{real.name}"
        else:
            with open(real, "rb") as f:
                head = f.read(1 << 20)
                f.seek(max(size - (1 << 20), 0))
                tail = f.read()
            ident = f"{size}:{real.stat().st_mtime_ns}:{hashlib.sha256(head + tail).hexdigest()}"
        digest.update(f"{rel}\0{ident}\n".encode())
    return digest.hexdigest()


def cache_key(cfg: EngineConfig, mode: str, prompt: str, continuations: Sequence[str] = (),
              fingerprint: str | None = None) -> str:
    """Key of one result: the model's fingerprint (its path when none is given), the settings that shape
    the answer, the mode, the prompt and the scored continuations."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    payload = json.dumps({"model": fingerprint or cfg.model, "settings": settings, "mode": mode, "prompt": prompt,
                          "cont": list(continuations)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load(cfg: EngineConfig):
    """(model, tokenizer) in eval mode from the local folder; nf4/int8 through bitsandbytes."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: the folder is already resolved locally
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(resolve_model(cfg.model))
    kwargs = {"local_files_only": True, "dtype": DTYPES[cfg.dtype]}
    if cfg.quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[cfg.dtype])
            if cfg.quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"model folder {folder} does not load as a causal LM with its tokenizer: {err}") from err
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


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


# ------------------------------------------------------------------------------------------------------- cache
@dataclass
class ResultCache:
    """Append-only jsonl shards, one per rank; a result is written once its batch is complete.

    ``valid`` tells an answer object from anything else on a line; torn lines (a kill mid-write) and
    lines that are JSON but no answer are skipped, counted and reported, and their prompts are redone."""

    folder: Path | str
    rank: int = 0
    valid: Callable[[dict], bool] = lambda row: True
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rank{self.rank}.jsonl"

    def load(self) -> dict[str, dict]:
        done: dict[str, dict] = {}
        self.skipped = []
        for shard in sorted(self.folder.glob("rank*.jsonl")):
            for number, line in enumerate(shard.read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    self.skipped.append(f"{shard.name} line {number}: not JSON (a line cut by a kill?)")
                    continue
                if not (isinstance(row, dict) and isinstance(row.get("key"), str) and self.valid(row)):
                    self.skipped.append(f"{shard.name} line {number}: JSON but not an answer object: {line[:80]!r}")
                    continue
                done.setdefault(row["key"], row)
        if self.skipped:
            warnings.warn(f"{self.folder}: skipped {len(self.skipped)} cache line(s); their prompts are redone. "
                          f"First: {self.skipped[0]}", stacklevel=2)
        return done

    def append(self, rows: list[dict]) -> None:
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a kill cut the last line: start on a fresh one
        try:
            with open(self.path, "a") as f:
                if torn:
                    f.write("\n")
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # a full disk, a read-only or vanished folder: name it; answers so far are kept
            raise UserError(f"cannot write answers to the cache {self.path} ({err.strerror or err}); free space "
                            "or choose another --cache, then rerun the same command: cached answers are kept") from None


def _answer_check(mode: str, continuations: Sequence[str]) -> Callable[[dict], bool]:
    if mode == "generate":
        return lambda row: isinstance(row.get("generated_text"), str)
    names = [_logprob_column(c, i) for i, c in enumerate(continuations)]
    return lambda row: all(isinstance(row.get(n), (int, float)) and not isinstance(row.get(n), bool) for n in names)


def _logprob_column(cont: str, i: int) -> str:
    return f"logprob_{cont.strip() or i}"


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
