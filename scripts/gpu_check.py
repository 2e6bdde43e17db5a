"""Throughput of the LLM engine's score and generate paths on a Llama-2-shaped model with random weights.

Same FLOPs and bytes as the real model (no download): ``--shape 13b`` on a GPU; ``--shape tiny`` runs the
same code on the CPU. Prints ``score_prompts_per_s=`` (nf4, ~450-token prompts, two 2-token label
continuations, through the engine's ``score_ids``: one prompt forward with logits at the last position,
second continuation tokens on the key/value cache), ``score_prompts_per_s_old=`` (the earlier path: each
continuation forwarded with its prompt, logits everywhere) and ``generate_s_per_prompt=`` (greedy, 64 new
tokens, batched and one prompt at a time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # memefx from the checkout, installed or not
from memefx.icl.engine import EngineStats, score_ids  # noqa: E402

SHAPES = {
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 32000},
}


def quantize_nf4(model: nn.Module, device: str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every Linear but the LM head by a bitsandbytes nf4 Linear4bit, one layer at a time."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))
                del child
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    p.add_argument("--prompt-tokens", type=int, default=450)
    p.add_argument("--score-batch", type=int, default=16)
    p.add_argument("--score-batches", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model = quantize_nf4(model, device, dtype).to(device).eval()
    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} shape={a.shape} nf4 "
          f"params={sum(p.numel() for p in model.parameters()) / 1e9:.2f}G(stored)")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, config.vocab_size, (a.score_batch * 2, a.prompt_tokens + 2), generator=g).to(device)
    prompts = ids[: a.score_batch, : a.prompt_tokens].tolist()
    conts = [[row[a.prompt_tokens:a.prompt_tokens + 2], row[a.prompt_tokens + 1:a.prompt_tokens + 3]]
             for row in ids[: a.score_batch].tolist()]
    with torch.inference_mode():
        model(input_ids=ids[:2])  # warm-up
        for name in ("new", "old"):
            rates = []
            for _ in range(a.repeats):
                sync(device)
                start = time.perf_counter()
                for _ in range(a.score_batches):
                    if name == "new":
                        score_ids(model, prompts, conts, 0, EngineStats())
                    else:  # 2 continuations per prompt, each forwarded with its prompt, logits at every position
                        logits = model(input_ids=ids).logits[:, -3:-1].float().log_softmax(-1)
                sync(device)
                rates.append(a.score_batch * a.score_batches / (time.perf_counter() - start))
            key = "score_prompts_per_s" if name == "new" else "score_prompts_per_s_old"
            print(f"{key}={statistics.median(rates):.2f}  (batch {a.score_batch} prompts x 2 continuations, "
                  f"{a.prompt_tokens} tokens, median of {a.repeats}; runs {', '.join(f'{r:.2f}' for r in rates)})")
        del logits
        prompt = ids[: a.gen_batch, : a.prompt_tokens]
        mask = torch.ones_like(prompt)
        for batch in (a.gen_batch, 1):
            sync(device)
            start = time.perf_counter()
            model.generate(input_ids=prompt[:batch], attention_mask=mask[:batch], max_new_tokens=a.new_tokens,
                           min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
            sync(device)
            print(f"generate_s_per_prompt={(time.perf_counter() - start) / batch:.3f}  (greedy, {a.new_tokens} new "
                  f"tokens, batch {batch})")


if __name__ == "__main__":
    main()
