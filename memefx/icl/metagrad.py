"""Meta-gradient measurements of in-context learning (SPEC section 6): the pure parts.

- ``target_spans``: token spans of each pair's meme text ("caption") and description ("image") in the
  target block, which ends every prompt, from the tokenizer's character offsets (any fast tokenizer).
- ``attention_mass``: for the target-block queries of each span kind, the attention mass that falls on the
  caption x caption, image x image and cross blocks, per head (one layer's map at a time, so memory stays
  linear in the number of layers kept).
- ``dual_form``: for linear attention, the output for query q splits exactly into W_ZSL q (keys of the
  query context) plus Delta W_ICL q = sum_j v_j k_j^T q over demonstration keys, grouped by span kind
  (Dai et al., 2023).
"""

from __future__ import annotations

import re

import torch

_PAIR_LINE = re.compile(r"^#(\d+): caption: '(.*?)', image: '(.*)'$", re.M)
CAPTION, IMAGE, OTHER = 0, 1, 2


def target_spans(prompt: str, offsets: list[tuple[int, int]]) -> list[dict]:
    """Per pair of the target block: token index ranges [start, end) of its caption and image fields.

    ``offsets``: the (char_start, char_end) of every token, as ``return_offsets_mapping`` gives them.
    """
    block_start = prompt.rfind("User:")
    if block_start < 0:
        raise ValueError("prompt has no 'User:' turn")
    pairs = []
    for match in _PAIR_LINE.finditer(prompt, block_start):
        spans = {}
        for kind, group in (("caption", 2), ("image", 3)):
            lo, hi = match.start(group), match.end(group)
            tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]
            spans[kind] = (tokens[0], tokens[-1] + 1) if tokens else None
        pairs.append({"pair": int(match.group(1)), **spans,
                      "caption_text": match.group(2), "image_text": match.group(3)})
    if not pairs:
        raise ValueError("no '#k: caption: ..., image: ...' line after the last 'User:' turn")
    return pairs


def span_labels(length: int, pairs: list[dict]) -> torch.Tensor:
    """(L,) CAPTION / IMAGE / OTHER label of every token of the prompt (target block spans only)."""
    labels = torch.full((length,), OTHER, dtype=torch.long)
    for pair in pairs:
        for kind, value in (("caption", CAPTION), ("image", IMAGE)):
            if pair[kind] is not None:
                labels[pair[kind][0]:pair[kind][1]] = value
    return labels


def attention_mass(attention: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean attention mass per head for the target-block blocks of one layer.

    ``attention``: (H, L, L) rows = queries; ``labels``: (L,) from ``span_labels``. Returns (H,) tensors:
    ``caption_caption`` (caption queries on caption keys), ``image_image``, and ``cross`` (caption queries
    on image keys and image queries on caption keys, averaged over those queries).
    """
    cap, img = (labels == CAPTION).to(attention.dtype), (labels == IMAGE).to(attention.dtype)
    on_cap = attention @ cap  # (H, L): mass each query puts on caption keys
    on_img = attention @ img

    def mean_over(queries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return (values * queries).sum(-1) / queries.sum().clamp_min(1)

    cross = (mean_over(cap, on_img) * cap.sum() + mean_over(img, on_cap) * img.sum()) / (cap.sum() + img.sum()).clamp_min(1)
    return {"caption_caption": mean_over(cap, on_cap), "image_image": mean_over(img, on_img), "cross": cross}


def dual_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, demo_groups: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split linear attention over demonstrations and context into W_ZSL q + sum_g Delta W_g q.

    ``q``: (Q, d) target-block queries; ``k``, ``v``: (L, d) keys and values of the whole prompt;
    ``demo_groups``: (L,) -1 for the query context (target block, instruction) and g >= 0 for the
    demonstration span group of each key (e.g. 0 text, 1 description, 2 answer, 3 other).
    Returns ``zsl`` (Q, d), ``delta`` {g: (Q, d)} and ``relative_norm`` {g: ||Delta W_g q|| / ||W_ZSL q||}.
    """
    context = demo_groups < 0
    w_zsl = v[context].T @ k[context]  # (d, d) = sum_j v_j k_j^T over the query context
    zsl = q @ w_zsl.T
    delta, relative = {}, {}
    for g in sorted(int(x) for x in demo_groups[~context].unique()):
        keep = demo_groups == g
        delta[g] = q @ (v[keep].T @ k[keep]).T
        relative[g] = delta[g].norm(dim=-1) / zsl.norm(dim=-1).clamp_min(1e-12)
    return {"zsl": zsl, "delta": delta, "relative_norm": relative}
