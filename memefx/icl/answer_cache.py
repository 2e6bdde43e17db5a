"""The answer cache: every result appended to ``<cache>/rank<r>.jsonl`` as soon as its batch is done, keyed
by a hash of (model fingerprint, mode, settings, prompt, continuations), so a killed run resumes without
losing or repeating a row, on any number of processes; torn lines are skipped and redone."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memefx.errors import UserError  # the one user-error class of memefx (exit 2)
from memefx.icl.llm import _NOT_IN_KEY, EngineConfig


def cache_key(cfg: EngineConfig, mode: str, prompt: str, continuations: Sequence[str] = (),
              fingerprint: str | None = None) -> str:
    """Key of one result: the model's fingerprint (its path when none is given), the settings that shape
    the answer, the mode, the prompt and the scored continuations."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    payload = json.dumps({"model": fingerprint or cfg.model, "settings": settings, "mode": mode, "prompt": prompt,
                          "cont": list(continuations)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


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
