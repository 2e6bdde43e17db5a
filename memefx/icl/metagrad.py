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

from memefx.attribution.masks import block_sums
from memefx.icl.grammar import PAIR_LINES
from memefx.schema import IMAGE as IMAGE_SEGMENT
from memefx.schema import SPECIAL, TEXT

CAPTION, IMAGE, OTHER = 0, 1, 2


def target_spans(prompt: str, offsets: list[tuple[int, int]]) -> list[dict]:
    """Per pair of the target block: token index ranges [start, end) of its caption and image fields.

    ``offsets``: the (char_start, char_end) of every token, as ``return_offsets_mapping`` gives them.
    """
    block_start = prompt.rfind("User:")
    if block_start < 0:
        raise ValueError("prompt has no 'User:' turn")
    pairs = []
    for match in PAIR_LINES.finditer(prompt, block_start):
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
    on image keys and image queries on caption keys, averaged over those queries). The block sums are MIDAS's
    own (``memefx.attribution.masks``: meme text as the text segment, description as the image segment).
    """
    segments = torch.full_like(labels, SPECIAL)
    segments[labels == CAPTION], segments[labels == IMAGE] = TEXT, IMAGE_SEGMENT
    sums = block_sums(attention[None], segments[None])[0]  # (H, 4): text, image, cross, special
    n_cap, n_img = float((labels == CAPTION).sum()), float((labels == IMAGE).sum())
    return {"caption_caption": sums[:, 0] / max(n_cap, 1.0), "image_image": sums[:, 1] / max(n_img, 1.0),
            "cross": sums[:, 2] / max(n_cap + n_img, 1.0)}


def dual_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, demo_groups: torch.Tensor,
              positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Split linear attention over demonstrations and context into W_ZSL q + sum_g Delta W_g q.

    ``q``: (..., Q, d) target-block queries; ``k``, ``v``: (..., L, d) keys and values of the whole prompt
    (leading dims, e.g. heads, batch the computation); ``demo_groups``: (L,) -1 for the query context
    (instruction, target block) and g >= 0 for the demonstration span group of each key (0 text,
    1 description, 2 answer, 3 other). With ``positions`` (Q,), query i only sees keys j <= positions[i]
    (causal models). Returns ``zsl`` (..., Q, d), ``delta`` {g: (..., Q, d)} and ``relative_norm``
    {g: ||Delta W_g q|| / ||W_ZSL q||} (..., Q).
    """
    scores = q @ k.transpose(-1, -2)  # (..., Q, L): the k_j^T q factors of sum_j v_j k_j^T q
    if positions is not None:
        scores = scores * (torch.arange(k.shape[-2], device=k.device)[None, :] <= positions[:, None])

    def part(mask: torch.Tensor) -> torch.Tensor:
        idx = mask.nonzero().flatten()
        return scores[..., idx] @ v[..., idx, :]

    zsl = part(demo_groups < 0)
    delta, relative = {}, {}
    for g in sorted(int(x) for x in demo_groups[demo_groups >= 0].unique()):
        delta[g] = part(demo_groups == g)
        relative[g] = delta[g].norm(dim=-1) / zsl.norm(dim=-1).clamp_min(1e-12)
    return {"zsl": zsl, "delta": delta, "relative_norm": relative}


DEMO_GROUPS = {0: "demo_text", 1: "demo_description", 2: "demo_answer", 3: "demo_other"}
CONTEXT, DEMO_TEXT, DEMO_DESCRIPTION, DEMO_ANSWER, DEMO_OTHER = -1, 0, 1, 2, 3
_DEMO_ANSWER = re.compile(r"\nSystem:\n\n(.*?)\n\n(?=User:\n)", re.S)


def demo_char_groups(prompt: str) -> list[int]:
    """Group of every character: -1 query context (the instruction line and the target block), else the
    demonstration span it lies in: 0 meme text, 1 description, 2 gold answer, 3 anything else of a
    demonstration (layout words, quotes, turn markers, blank lines).

    Demonstration blocks run from the end of the instruction line to the last ``User:`` turn (the target).
    Each demonstration's answer is the text between its ``System:`` turn and the blank line before the next
    ``User:`` turn, so the last demonstration's answer (followed by the target's ``User:``) counts too.
    """
    target = prompt.rfind("User:")
    if target < 0:
        raise ValueError("prompt has no 'User:' turn")
    labels = [CONTEXT] * len(prompt)
    instruction_end = prompt.find("\n")
    if target == 0 or instruction_end < 0:
        return labels  # zero-shot: no demonstration
    labels[instruction_end + 1:target] = [DEMO_OTHER] * (target - instruction_end - 1)
    demos = prompt[:target]
    for match in PAIR_LINES.finditer(demos):
        for group, kind in ((2, DEMO_TEXT), (3, DEMO_DESCRIPTION)):
            labels[match.start(group):match.end(group)] = [kind] * (match.end(group) - match.start(group))
    for match in _DEMO_ANSWER.finditer(prompt, 0, target + len("User:\n")):
        labels[match.start(1):match.end(1)] = [DEMO_ANSWER] * (match.end(1) - match.start(1))
    return labels


def demo_groups(prompt: str, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """(L,) group of every token (see ``demo_char_groups``). A token that straddles spans takes the first
    meme text / description / answer character it covers, else ``demo_other`` if it covers any
    demonstration character, else the query context; empty tokens (special, zero-width) are context."""
    chars = demo_char_groups(prompt)
    labels = torch.full((len(offsets),), CONTEXT, dtype=torch.long)
    for t, (a, b) in enumerate(offsets):
        covered = chars[a:b]
        content = [g for g in covered if g in (DEMO_TEXT, DEMO_DESCRIPTION, DEMO_ANSWER)]
        if content:
            labels[t] = content[0]
        elif DEMO_OTHER in covered:
            labels[t] = DEMO_OTHER
    return labels
