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


def dual_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, demo_groups: torch.Tensor,
              positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Split linear attention over demonstrations and context into W_ZSL q + sum_g Delta W_g q.

    ``q``: (Q, d) target-block queries; ``k``, ``v``: (L, d) keys and values of the whole prompt;
    ``demo_groups``: (L,) -1 for the query context (instruction, target block) and g >= 0 for the
    demonstration span group of each key (0 text, 1 description, 2 answer, 3 other). With ``positions``
    (Q,), query i only sees keys j <= positions[i] (causal models). Returns ``zsl`` (Q, d), ``delta``
    {g: (Q, d)} and ``relative_norm`` {g: ||Delta W_g q|| / ||W_ZSL q||} (Q,).
    """
    scores = q @ k.T  # (Q, L): the k_j^T q factors of sum_j v_j k_j^T q
    if positions is not None:
        scores = scores * (torch.arange(k.shape[0], device=k.device)[None, :] <= positions[:, None])
    context = (demo_groups < 0).to(scores.dtype)
    zsl = (scores * context) @ v
    delta, relative = {}, {}
    for g in sorted(int(x) for x in demo_groups[demo_groups >= 0].unique()):
        delta[g] = (scores * (demo_groups == g).to(scores.dtype)) @ v
        relative[g] = delta[g].norm(dim=-1) / zsl.norm(dim=-1).clamp_min(1e-12)
    return {"zsl": zsl, "delta": delta, "relative_norm": relative}


DEMO_GROUPS = {0: "demo_text", 1: "demo_description", 2: "demo_answer", 3: "demo_other"}


def demo_groups(prompt: str, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """(L,) group of every token: -1 query context (instruction and target block), else the demonstration
    span it lies in: 0 meme text, 1 description, 2 gold answer, 3 anything else of a demonstration."""
    target = prompt.rfind("User:")
    instruction_end = prompt.find("\n")
    spans = []  # (char_lo, char_hi, group), later entries win
    spans.append((instruction_end + 1, target, 3))
    for match in _PAIR_LINE.finditer(prompt[:target]):
        spans += [(match.start(2), match.end(2), 0), (match.start(3), match.end(3), 1)]
    for match in re.finditer(r"System:\n\n(.*?)\n\n(?=User:)", prompt[:target], re.S):
        spans.append((match.start(1), match.end(1), 2))
    labels = torch.full((len(offsets),), -1, dtype=torch.long)
    for lo, hi, group in spans:
        for t, (a, b) in enumerate(offsets):
            if b > a and a < hi and b > lo:
                labels[t] = group
    return labels
