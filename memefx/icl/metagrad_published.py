"""The meta-gradient features of the reference study, computed as its code and notebook computed them.

The reference pipeline (``script/llama/hf``: ``few_shot_generation.py`` through its own copy of the
``text-generation`` pipeline, then ``meta_gradient.py``, ``calculation.py``, ``modality_generation.py``, then
the notebook ``hf_llama2.ipynb``), rule by rule:

- **tokens**: the prompt as the pipeline tokenised it, ``add_special_tokens=False``: no BOS. The meta-gradient
  script indexes ``tokenizer.tokenize(prompt)``, which has no BOS either.
- **layer**: 0 only. The pipeline's ``postprocess`` zips the one generated sequence with the first step's
  per-layer tuple of attention maps, so the map it saved is layer 0's, ``(1, heads, L, L)``.
- **spans** (token indices, end exclusive), per pair ``p`` of the target block: ``caption`` runs from the
  token that starts the ``caption`` label of its line to the token that starts its ``image`` label (the
  label, ``: '``, the meme text and ``', ``); ``image`` runs from the ``image`` label to two tokens before the
  next pair's ``caption`` label (``: '``, the description, ``'``, the newline and the next line's ``#``);
  for the last pair, ``next`` is ``L - 3``, so the span stops at ``L - 5``. The script found the labels as
  the token strings ``▁ca`` + ``ption`` and ``▁image``; memefx finds the labels of the target's pair lines
  from character offsets (any tokenizer). The two agree on prompts whose fields hold neither word, which
  the prompt procedure guarantees (it rewrites them to "text" / "picture").
- **vectors**: for every query token, the attention mass summed over heads and over the keys of the block:
  ``caption`` (caption queries on caption keys, all pairs' captions), ``image`` (image on image), ``cross``
  (caption queries on image keys, image queries on caption keys); then the entries that are exactly 0 are
  dropped (``vector[vector != 0]``), which removes every token outside the spans and, in ``cross``, the first
  pair's caption tokens (no image key before them under the causal mask).
- **delta**: the group's first k-shot prompt (``delta_1``: the second prompt file of the group, the 1-shot
  one unless it was dropped) against its zero-shot prompt: ``shot[-len(zero):] - zero``, the k-shot vector
  cut to the zero-shot length from its end.
- **padding**: the notebook pads each vector with zeros at its end to 100 (caption), 172 (image) and 212
  (cross) values (``F.pad``; a longer vector is cut at its end), so feature ``i`` is the ``i``-th token from
  the start of the span.
- **rows**: every answer row of a group gets the same vector, the zero-shot values and ``delta_1``,
  whatever its own shot count: ``caption_zsl``, ``caption_delta_1``, ``image_zsl``, ... (968 features).

Column names: ``L0_P_<kind>_p<i>_zs`` / ``_delta`` for the notebook's ``<ref>_zsl_<i>`` / ``<ref>_delta_1_<i>``
(kind ``caption_caption`` = ``caption``, ``image_image`` = ``image``, ``cross`` = ``cross``), in the
notebook's column order.
"""

from __future__ import annotations

import pandas as pd
import torch

from memefx.icl.grammar import PAIR_LINES, parse_prompt, render

PUBLISHED_LAYER = 0
PUBLISHED_PAD = {"caption_caption": 100, "image_image": 172, "cross": 212}
REFERENCE_NAMES = {"caption_caption": "caption", "image_image": "image", "cross": "cross"}
_CAPTION_LABEL, _IMAGE_LABEL = "caption: '", "image: '"


class _Stop(Exception):
    """Raised by the layer-0 hook: the published form needs no later layer, so the forward stops there."""


def _label_token(offsets: list[tuple[int, int]], char: int, prompt: str) -> int:
    """Index of the token that holds character ``char`` (the first letter of a label)."""
    for t, (a, b) in enumerate(offsets):
        if a <= char < b:
            return t
    raise ValueError(f"no token covers character {char} ({prompt[char:char + 10]!r}) of the prompt: the tokenizer "
                     "returned no offsets for it")


def reference_spans(prompt: str, offsets: list[tuple[int, int]]) -> list[dict]:
    """Per pair of the target block: token ranges [start, end) of its ``caption`` and ``image`` spans by the
    reference rules (module docstring). ``offsets``: the (char_start, char_end) of every token of the prompt
    tokenised without special tokens."""
    block_start = prompt.rfind("User:")
    if block_start < 0:
        raise ValueError("prompt has no 'User:' turn")
    lines = list(PAIR_LINES.finditer(prompt, block_start))
    if not lines:
        raise ValueError("no '#k: caption: ..., image: ...' line after the last 'User:' turn")
    captions = [_label_token(offsets, m.start(2) - len(_CAPTION_LABEL), prompt) for m in lines]
    images = [_label_token(offsets, m.start(3) - len(_IMAGE_LABEL), prompt) for m in lines]
    nexts = [*captions[1:], len(offsets) - 3]  # meta_gradient.py appends len(tokens) - 3 after the last caption
    return [{"pair": int(m.group(1)), "caption": (captions[p], images[p]), "image": (images[p], nexts[p] - 2)}
            for p, m in enumerate(lines)]


def span_masks(length: int, spans: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) boolean masks of the caption and image tokens (a span whose end precedes its start is empty)."""
    caption = torch.zeros(length, dtype=torch.bool)
    image = torch.zeros(length, dtype=torch.bool)
    for span in spans:
        caption[span["caption"][0]:span["caption"][1]] = True
        image[span["image"][0]:span["image"][1]] = True
    if (caption & image).any():
        raise ValueError(f"caption and image spans overlap at tokens {(caption & image).nonzero().flatten().tolist()}")
    return caption, image


def reference_vectors(attention: torch.Tensor, caption: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query mass of one layer's map ``attention`` (H, L, L; rows = queries), summed over heads and the
    keys of each block, with the exact zeros dropped: ``caption_caption``, ``image_image``, ``cross``."""
    summed = attention.float().sum(0)
    on_caption, on_image = summed @ caption.float(), summed @ image.float()
    zero = torch.zeros_like(on_caption)
    vectors = {"caption_caption": torch.where(caption, on_caption, zero),
               "image_image": torch.where(image, on_image, zero),
               "cross": torch.where(caption, on_image, torch.where(image, on_caption, zero))}
    return {kind: vector[vector != 0] for kind, vector in vectors.items()}


def reference_delta(shot: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``shot[-len(zero):] - zero``: the k-shot vector cut to the zero-shot length from its end."""
    if len(shot) < len(zero):
        raise ValueError(f"the k-shot vector has {len(shot)} values, fewer than the zero-shot one's {len(zero)} "
                         "(the reference code fails here too)")
    return shot[len(shot) - len(zero):] - zero


def pad_end(vector: torch.Tensor, length: int) -> tuple[torch.Tensor, bool]:
    """Zeros appended up to ``length``, or the vector cut at its end when longer (as ``F.pad`` does with a
    negative pad); returns the vector and whether it was cut."""
    if len(vector) > length:
        return vector[:length], True
    return torch.cat([vector, vector.new_zeros(length - len(vector))]), False


def group_columns(zero: dict[str, torch.Tensor], shot: dict[str, torch.Tensor] | None,
                  pad: dict[str, int] | None = None) -> tuple[dict[str, float], int]:
    """The features every row of a group gets: per kind the padded zero-shot vector, then the padded delta
    (0 without a k-shot prompt), in the notebook's column order. Returns them and how many vectors were cut."""
    pad = PUBLISHED_PAD if pad is None else pad
    out: dict[str, float] = {}
    cut = 0
    for kind, length in pad.items():
        delta = reference_delta(shot[kind], zero[kind]) if shot is not None else torch.zeros(len(zero[kind]))
        for phase, vector in (("zs", zero[kind]), ("delta", delta)):
            padded, was_cut = pad_end(vector, length)
            cut += was_cut
            out.update({f"L{PUBLISHED_LAYER}_P_{kind}_p{i}_{phase}": float(v) for i, v in enumerate(padded.tolist())})
    return out, cut


@torch.no_grad()
def prompt_vectors(model, tok, prompt: str) -> dict[str, torch.Tensor]:
    """One forward of ``prompt`` as the reference ran it (no BOS), stopped after layer 0, reduced to the
    three per-query vectors of the target block."""
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    offsets = [tuple(x) for x in enc.pop("offset_mapping")[0].tolist()]
    caption, image = span_masks(len(offsets), reference_spans(prompt, offsets))
    store: dict[str, dict[str, torch.Tensor]] = {}

    def hook(module, args, kwargs, output):
        weights = output[1]
        if weights is None:
            raise RuntimeError("attention weights not returned: load the model with attn_implementation='eager'")
        store["vectors"] = {k: v.cpu() for k, v in reference_vectors(weights[0], caption.to(weights.device),
                                                                     image.to(weights.device)).items()}
        raise _Stop

    handle = model.model.layers[PUBLISHED_LAYER].self_attn.register_forward_hook(hook, with_kwargs=True)
    try:
        model(input_ids=enc["input_ids"].to(model.device), output_attentions=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    return store["vectors"]


def _zero_shot_prompt(rows: pd.DataFrame) -> str:
    """The group's zero-shot prompt: its 0-shot row when the table has one, else its target block alone."""
    zero = rows[rows.few_shot_num == 0]
    return zero.prompt.iloc[0] if len(zero) else render(parse_prompt(rows.prompt.iloc[0])[-1:])


def published_table(prompts: pd.DataFrame, model, tok, pad: dict[str, int] | None = None) -> pd.DataFrame:
    """One row per (image_id, few_shot_num) of ``prompts`` (columns image_id, few_shot_num, prompt), every row
    of a group with the group's features (``group_columns``).

    ``df.attrs``: ``published_vectors_cut`` (vectors longer than their pad length, cut at the end) and
    ``published_groups_without_kshot`` (groups with no k-shot prompt: delta 0, where the notebook failed on
    the missing ``delta_1`` file).
    """
    rows, cut, without = [], 0, []
    for image_id, group in prompts.groupby("image_id", sort=False):
        zero = prompt_vectors(model, tok, _zero_shot_prompt(group))
        shots = group[group.few_shot_num > 0].sort_values("few_shot_num")
        shot = prompt_vectors(model, tok, shots.prompt.iloc[0]) if len(shots) else None
        if shot is None:
            without.append(image_id)
        try:
            columns, n_cut = group_columns(zero, shot, pad)
        except ValueError as err:
            raise ValueError(f"image_id {image_id}, {shots.few_shot_num.iloc[0]}-shot against 0-shot: {err}") from None
        cut += n_cut
        rows += [{"image_id": image_id, "few_shot_num": int(k), **columns} for k in group.few_shot_num]
    table = pd.DataFrame(rows)
    table.attrs.update(published_vectors_cut=cut, published_groups_without_kshot=without)
    return table
