"""The LLM side of in-context evaluation: the engine's settings (``EngineConfig``), which model a name
means (a local folder, or the local Hugging Face cache for a hub id: never the network) and its
fingerprint, and loading it (bf16/fp16, or quantized with bitsandbytes)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
