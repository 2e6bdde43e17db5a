"""Per-layer meta-gradient features of a causal LM on pair-selection prompts, in two forms.

- ``ours``: per layer and head, the mean attention mass of the target's caption / image query tokens on
  the caption x caption, image x image and cross blocks, zero-shot and (k-shot minus zero-shot), plus the
  dual-form norms of each demonstration span group relative to the zero-shot term; every (group, shot)
  row its own delta.
- ``published``: the reference study's features exactly as its code computed them (layer 0, no BOS, its
  spans, zero-shot vector and ``delta_1`` padded at the end to 100/172/212, the same vector on every row of
  a group): ``memefx.icl.metagrad_published``.

For ``ours``, forward hooks on every attention module reduce that layer's attention map and q/k/v to a few
numbers per head as soon as the layer has run, and hand ``None`` on instead of the L x L map: the extra
memory grows with the number of layers kept times heads, never with layers x L^2.

Every row also carries the prompt layout (``few_shot_num``, ``layout_prompt_tokens``, ``layout_pairs``):
the analysis compares the features against a baseline that knows only the layout.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import pandas as pd
import torch

from memefx.icl.engine import encode_prompt
from memefx.icl.grammar import parse_prompt, render
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
from memefx.icl.metagrad_published import PUBLISHED_PAD, prompt_vectors, published_table

FeatureForm = Literal["ours", "published", "both"]
LAYOUT_COLUMNS = ("few_shot_num", "layout_prompt_tokens", "layout_pairs")


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
            ours = {f"{name}": value.detach().cpu() for name, value in mass.items()}
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
                ours[f"dual_{DEMO_GROUPS[g]}"] = torch.zeros(q.shape[1])
            if (groups >= 0).any():  # all heads at once: (H, Q, d) queries against (H, L, d) keys
                dual = dual_form(q[0][:, queries].float(), k[0].float(), v[0].float(), groups, queries)
                for g, rel in dual["relative_norm"].items():
                    ours[f"dual_{DEMO_GROUPS[g]}"] = rel.mean(-1).cpu()
            store[layer] = ours
            return (attn_output, None, *output[2:])  # the L x L map stops here

        return hook

    handles = [_attention_modules(model)[layer].register_forward_hook(make(layer), with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forms(features: FeatureForm) -> tuple[str, ...]:
    if features not in ("ours", "published", "both"):
        raise ValueError(f"features={features!r}: use 'ours', 'published' or 'both'")
    return ("ours", "published") if features == "both" else (features,)


@torch.no_grad()
def prompt_record(model, tok, prompt: str, layers: list[int] | None = None, features: FeatureForm = "ours") -> dict:
    """Features of one prompt: {"tokens": L, "ours": flat per-head features of the layers asked (when
    asked), "published": {kind: per-token vector} of layer 0 (when asked, ``metagrad_published.prompt_vectors``)}.

    Our tokens are those the engine answered from (``memefx.icl.engine.encode_prompt``): the tokenizer's
    BOS first when it has one (a Llama without it puts its attention sink on the first word), no other
    special token; the BOS covers no character, so it lies in no span. The published form runs its own
    forward on the tokens the reference pipeline read, without BOS."""
    forms = _forms(features)
    out: dict = {"tokens": len(encode_prompt(tok, prompt))}
    if "published" in forms:
        out["published"] = prompt_vectors(model, tok, prompt)
    if "ours" in forms:
        out["ours"] = _ours_record(model, tok, prompt, layers)
    return out


def _ours_record(model, tok, prompt: str, layers: list[int] | None) -> dict[str, float]:
    """One forward with the engine's tokens, hooks on the layers asked: {``L<l>_H<h>_<name>``: value}."""
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    offsets = [tuple(x) for x in enc.pop("offset_mapping")[0].tolist()]
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None:
        enc["input_ids"] = torch.cat([torch.tensor([[bos]], dtype=enc["input_ids"].dtype), enc["input_ids"]], 1)
        offsets = [(0, 0), *offsets]
    labels = span_labels(len(offsets), target_spans(prompt, offsets))
    groups = demo_groups(prompt, offsets)
    layers = list(range(len(_attention_modules(model)))) if layers is None else layers
    store: dict = {}
    with _reducing_hooks(model, layers, labels, groups, store):
        model(input_ids=enc["input_ids"].to(model.device), output_attentions=True)
    flat = {}
    for layer, ours in store.items():
        for name, per_head in ours.items():
            for h, value in enumerate(per_head.tolist()):
                flat[f"L{layer}_H{h}_{name}"] = value
    return flat


def prompt_features(model, tok, prompt: str, layers: list[int] | None = None) -> dict[str, float]:
    """Flat features of one prompt in our form: per layer and head the attention mass blocks and dual-form norms."""
    return prompt_record(model, tok, prompt, layers)["ours"]


def _checked_blocks(row) -> list:
    """The prompt's blocks, or an error naming the row when it is not a pair-selection prompt of its shot count."""
    try:
        blocks = parse_prompt(row.prompt) if isinstance(row.prompt, str) else None
    except ValueError as err:
        raise ValueError(f"image_id {row.image_id}, {row.few_shot_num}-shot: not a pair-selection prompt "
                         f"({err}); meta-gradient features need the pair prompts of memefx icl prompts") from None
    if blocks is None:
        raise ValueError(f"image_id {row.image_id}, {row.few_shot_num}-shot: prompt is {row.prompt!r}, not text")
    if len(blocks) != int(row.few_shot_num) + 1:
        raise ValueError(f"image_id {row.image_id}: few_shot_num={row.few_shot_num} but the prompt holds "
                         f"{len(blocks) - 1} demonstrations; fix the table or regenerate its prompts")
    return blocks


def features_table(answers: pd.DataFrame, model, tok, layers: list[int] | None = None,
                   features: FeatureForm = "ours", pad: dict[str, int] | None = None) -> pd.DataFrame:
    """One row per (target group, shot count): the layout columns and the features of the asked form(s).

    ``ours``: zero-shot features come from the target block alone; for k >= 1 the deltas are k-shot minus
    zero-shot (exactly 0 at k = 0 by construction). ``published``: the group's features on every row of the
    group (``memefx.icl.metagrad_published.published_table``; ``pad`` the pad lengths, default
    ``PUBLISHED_PAD``), its ``df.attrs`` carried over.
    """
    forms = _forms(features)
    missing = {"image_id", "few_shot_num", "prompt"} - set(answers.columns)
    if missing:
        raise ValueError(f"answers table lacks columns {sorted(missing)}: it needs image_id, few_shot_num, prompt")
    prompts = answers.drop_duplicates(["image_id", "few_shot_num"])
    checked = [(row, _checked_blocks(row)) for row in prompts.itertuples()]
    rows = []
    zero_cache: dict[str, dict] = {}
    for row, blocks in checked:
        out = {"image_id": row.image_id, "few_shot_num": int(row.few_shot_num),
               "layout_prompt_tokens": len(encode_prompt(tok, row.prompt)), "layout_pairs": len(blocks[-1].members)}
        if "ours" in forms:
            zero_prompt = render(blocks[-1:])
            if zero_prompt not in zero_cache:
                zero_cache[zero_prompt] = prompt_record(model, tok, zero_prompt, layers)
            zero = zero_cache[zero_prompt]
            shot = prompt_record(model, tok, row.prompt, layers) if row.few_shot_num else zero
            for name, value in zero["ours"].items():
                if "_dual_" not in name:
                    out[f"{name}_zs"] = value
                    out[f"{name}_delta"] = shot["ours"][name] - value
            out.update({name: value for name, value in shot["ours"].items() if "_dual_" in name})
        rows.append(out)
    table = pd.DataFrame(rows)
    if "published" in forms:
        published = published_table(prompts[["image_id", "few_shot_num", "prompt"]], model, tok,
                                    PUBLISHED_PAD if pad is None else pad)
        table = table.merge(published, on=["image_id", "few_shot_num"], how="left", validate="one_to_one")
        table.attrs.update(published.attrs)
    return table
