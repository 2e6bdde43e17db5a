"""Per-layer, per-head meta-gradient features of a causal LM on pair-selection prompts.

Forward hooks on every attention module reduce that layer's attention map and q/k/v to a few numbers per
head as soon as the layer has run, and hand ``None`` on instead of the L x L map: the extra memory grows
with the number of layers kept times heads, never with layers x L^2.
"""

from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
import torch

from memefx.icl.metagrad import (
    CAPTION,
    DEMO_GROUPS,
    IMAGE,
    attention_mass,
    demo_groups,
    dual_form,
    span_labels,
    target_spans,
)
from memefx.icl.prompts import parse_prompt, render


def _attention_modules(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


@contextmanager
def _reducing_hooks(model, layers: list[int], labels: torch.Tensor, groups: torch.Tensor, store: dict):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    queries = ((labels == CAPTION) | (labels == IMAGE)).nonzero().flatten()

    def make(layer: int):
        def hook(module, args, kwargs, output):
            attn_output, weights = output[0], output[1]
            if weights is None:
                raise RuntimeError("attention weights not returned: load the model with attn_implementation='eager'")
            mass = attention_mass(weights[0].float(), labels)
            record = {f"{name}": value.detach().cpu() for name, value in mass.items()}
            hidden = args[0] if args else kwargs["hidden_states"]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            v = module.v_proj(hidden).view(shape).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            for g in DEMO_GROUPS:
                record[f"dual_{DEMO_GROUPS[g]}"] = torch.zeros(q.shape[1])
            if (groups >= 0).any():
                for h in range(q.shape[1]):
                    dual = dual_form(q[0, h, queries].float(), k[0, h].float(), v[0, h].float(), groups, queries)
                    for g, rel in dual["relative_norm"].items():
                        record[f"dual_{DEMO_GROUPS[g]}"][h] = rel.mean().cpu()
            store[layer] = record
            return (attn_output, None, *output[2:])  # the L x L map stops here

        return hook

    handles = [_attention_modules(model)[layer].register_forward_hook(make(layer), with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def prompt_features(model, tok, prompt: str, layers: list[int] | None = None) -> dict[str, float]:
    """Flat features of one prompt: per layer and head the attention mass blocks and dual-form norms."""
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    offsets = [tuple(x) for x in enc.pop("offset_mapping")[0].tolist()]
    labels = span_labels(len(offsets), target_spans(prompt, offsets))
    groups = demo_groups(prompt, offsets)
    layers = list(range(len(_attention_modules(model)))) if layers is None else layers
    store: dict = {}
    with _reducing_hooks(model, layers, labels, groups, store):
        model(input_ids=enc["input_ids"].to(model.device), output_attentions=True)
    flat = {}
    for layer, record in store.items():
        for name, per_head in record.items():
            for h, value in enumerate(per_head.tolist()):
                flat[f"L{layer}_H{h}_{name}"] = value
    return flat


def features_table(answers: pd.DataFrame, model, tok, layers: list[int] | None = None) -> pd.DataFrame:
    """One row per (target group, shot count): zero-shot features (the target block alone) and, for
    k >= 1, k-shot minus zero-shot deltas of the attention mass, plus the dual-form norms."""
    rows = []
    prompts = answers.drop_duplicates(["image_id", "few_shot_num"])
    zero_cache: dict[str, dict] = {}
    for row in prompts.itertuples():
        blocks = parse_prompt(row.prompt)
        zero_prompt = render(blocks[-1:])
        if zero_prompt not in zero_cache:
            zero_cache[zero_prompt] = prompt_features(model, tok, zero_prompt, layers)
        zero = zero_cache[zero_prompt]
        shot = prompt_features(model, tok, row.prompt, layers) if row.few_shot_num else zero
        out = {"image_id": row.image_id, "few_shot_num": row.few_shot_num}
        for name, value in zero.items():
            if "_dual_" not in name:
                out[f"{name}_zs"] = value
                out[f"{name}_delta"] = shot[name] - value
        out.update({name: value for name, value in shot.items() if "_dual_" in name})
        rows.append(out)
    return pd.DataFrame(rows)
