"""Peak memory of meta-gradient feature extraction against the number of layers kept.

Each measurement runs in a fresh process (peak RSS): the hooks reduce every layer's L x L attention map as
it is produced (``hooks``: our per-head form; ``hooks_both``: ours plus the published per-token vectors),
versus a forward that returns every layer's map (``output_attentions=True``).

    python benchmarks/metagrad_memory.py [--tokens 1500] [--layers 2 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(mode: str, layers: int, tokens: int) -> None:
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memefx.data.collate import train_wordpiece
    from memefx.icl.metagrad_features import prompt_features, prompt_record
    from memefx.icl.prompts import Member, pair_prompt

    words = [f"w{i}" for i in range(300)]
    tok = train_wordpiece([" ".join(words)], 400)
    per_pair = max(1, tokens // 40)
    demo = [[Member(" ".join(words[(d + j) % 300] for j in range(12)), "a picture", j % 2) for j in range(2)]
            for d in range(per_pair)]
    prompt = pair_prompt([Member("w1 w2 w3", "a picture"), Member("w4 w5", "a picture")], demo)
    folder = tempfile.mkdtemp()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192)).save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    n = len(tok(prompt)["input_ids"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if mode == "hooks":
            prompt_features(model, tok, prompt)
        elif mode == "hooks_both":
            prompt_record(model, tok, prompt, features="both")
        else:
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            maps = model(input_ids=ids, output_attentions=True).attentions
            assert len(maps) == layers
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "layers": layers, "tokens": n, "extra_mib": (peak - base) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--child", nargs=3)
    a = p.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]))
        return
    for layers in a.layers:
        row = {}
        for mode in ("hooks", "hooks_both", "all_maps"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(layers), str(a.tokens)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row[mode] = json.loads(out)
        print(f"layers={layers} tokens={row['hooks']['tokens']} extra_mib_hooks={row['hooks']['extra_mib']:.1f} "
              f"extra_mib_hooks_both={row['hooks_both']['extra_mib']:.1f} "
              f"extra_mib_all_maps={row['all_maps']['extra_mib']:.1f}")


if __name__ == "__main__":
    main()
