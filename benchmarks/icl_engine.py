"""Tokens forwarded and padding of the LLM engine's score path, old and new side by side, on a tiny Llama (CPU).

Old: every (prompt, continuation) joined and forwarded in full, batches in table order, logits at every
position. New (``memefx.icl.engine``): one forward per prompt with logits at its last position, further
continuation tokens on the prompt's key/value cache, batches of similar token counts. The prompt set is the
published one (unique prompts of ``../shared/data/llm_answers.csv``) where present, else a synthetic set of
pair-selection prompts of 0 to 4 demonstrations (similar lengths).

    python benchmarks/icl_engine.py [--n 96] [--batch 8] [--repeats 3]

Prints key=value lines: ``forwarded_tokens_per_prompt_token_{old,new}``, ``padding_fraction_{old,new}``
(score forwards), ``generate_padding_fraction_{old,new}`` (the prefill of generate mode, same batching),
``score_seconds_{old,new}`` (median of repeats), ``speedup`` and the largest log-probability difference.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memefx.data.collate import train_wordpiece
from memefx.icl.engine import EngineStats, encode_continuations, encode_prompt, length_batches, score_ids
from memefx.icl.prompts import Member, pair_prompt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_answers.csv"
CONTINUATIONS = (" benign", " hateful")


def prompt_set(n: int, seed: int = 0) -> tuple[list[str], str]:
    if SHARED.is_file():
        prompts = pd.read_csv(SHARED).prompt.drop_duplicates().tolist()
        return random.Random(seed).sample(prompts, min(n, len(prompts))), "published"
    rng = random.Random(seed)
    words = "the a man woman dog when you they see me my is are not with love hate people day picture of".split()

    def member() -> Member:
        return Member(" ".join(rng.choices(words, k=rng.randint(4, 14))), " ".join(rng.choices(words, k=rng.randint(5, 20))),
                      rng.randint(0, 1))

    prompts = [pair_prompt([member() for _ in range(rng.randint(2, 4))],
                           [[member() for _ in range(rng.randint(2, 3))] for _ in range(rng.randint(0, 4))])
               for _ in range(n)]
    return prompts, "synthetic"


@torch.no_grad()
def _old_score(model, tok, prompts: list[str], batch: int, stats: EngineStats,
               continuations: tuple[str, ...] = CONTINUATIONS) -> list[list[float]]:
    """The engine before this change: each continuation forwarded with its prompt, table-order batches."""
    out = []
    for start in range(0, len(prompts), batch):
        texts, spans = [], []
        for prompt in prompts[start:start + batch]:
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            stats.prompt_tokens += n_prompt
            for cont in continuations:
                full = tok(prompt + cont, add_special_tokens=False)["input_ids"]
                texts.append(prompt + cont)
                spans.append(len(full) - n_prompt)
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        real = int(enc["attention_mask"].sum())
        stats.forwarded_tokens += real
        stats.padded_positions += enc["attention_mask"].numel() - real
        stats.forwards += 1
        logprobs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().log_softmax(-1)
        scores = []
        for row, n_cont in enumerate(spans):
            targets = enc["input_ids"][row, -n_cont:]
            scores.append(float(logprobs[row, -n_cont - 1:-1].gather(1, targets[:, None]).sum()))
        out += [scores[i:i + len(continuations)] for i in range(0, len(scores), len(continuations))]
    return out


def _new_score(model, tok, prompts: list[str], batch: int, stats: EngineStats,
               continuations: tuple[str, ...] = CONTINUATIONS) -> list[list[float]]:
    ids = [encode_prompt(tok, p) for p in prompts]
    conts = [encode_continuations(tok, p, continuations) for p in prompts]
    out: list[list[float] | None] = [None] * len(prompts)
    for chunk in length_batches([len(i) for i in ids], batch):
        for i, lp in zip(chunk, score_ids(model, [ids[i] for i in chunk], [conts[i] for i in chunk], tok.pad_token_id, stats)):
            out[i] = lp  # back in the table's order
    return out


def padding(lengths: list[int], batches: list[list[int]]) -> float:
    width = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / width


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=96, help="prompts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--continuations", default="| benign,| hateful",
                   help="comma-separated label continuations, '|' standing for a leading space")
    a = p.parse_args()
    continuations = tuple(c.replace("|", " ") for c in a.continuations.split(","))
    prompts, source = prompt_set(a.n)
    tok = train_wordpiece(prompts, 2000)
    tok.padding_side = "left"  # as memefx.icl.engine.load sets it
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id)
    with tempfile.TemporaryDirectory() as folder:  # the engine's path: weights saved and loaded back
        LlamaForCausalLM(config).save_pretrained(folder)
        model = LlamaForCausalLM.from_pretrained(folder).eval()
    lengths = [len(encode_prompt(tok, q)) for q in prompts]
    n_cont = [len(c) for c in encode_continuations(tok, prompts[0], continuations)]
    print(f"continuation_tokens={n_cont} prompts={len(prompts)} source={source} tokens_median={int(statistics.median(lengths))} "
          f"tokens_max={max(lengths)} batch={a.batch}")
    times = {"old": [], "new": []}
    results, stats = {}, {}
    for _ in range(a.repeats):
        for name, fn in (("old", _old_score), ("new", _new_score)):
            s = EngineStats()
            start = time.perf_counter()
            results[name] = fn(model, tok, prompts, a.batch, s, continuations)
            times[name].append(time.perf_counter() - start)
            stats[name] = s
    diff = max(abs(x - y) for r_old, r_new in zip(results["old"], results["new"]) for x, y in zip(r_old, r_new))
    table_order = [list(range(i, min(i + a.batch, len(prompts)))) for i in range(0, len(prompts), a.batch)]
    for name in ("old", "new"):
        s = stats[name]
        print(f"forwarded_tokens_per_prompt_token_{name}={s.forwarded_tokens / s.prompt_tokens:.4f}")
        print(f"padding_fraction_{name}={s.padding_fraction:.4f}")
    print(f"generate_padding_fraction_old={padding(lengths, table_order):.4f}")
    print(f"generate_padding_fraction_new={padding(lengths, length_batches(lengths, a.batch)):.4f}")
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"score_seconds_old={old:.3f}")
    print(f"score_seconds_new={new:.3f}")
    print(f"speedup={old / new:.2f}")
    print(f"max_abs_logprob_diff={diff:.2e}")


if __name__ == "__main__":
    main()
