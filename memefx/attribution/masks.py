"""Attention blocks from the segment tensor (SPEC section 3).

For queries i and keys j of one sample: ``text`` = text x text, ``image`` = image x image,
``cross`` = text x image + image x text, ``special`` = every non-pad entry whose row or column is a
special token. Pad rows and columns belong to no block, so the four blocks partition the non-pad entries.
Block sums are bilinear forms of indicator vectors (one pass over the scores), never T x T masks.
"""

from __future__ import annotations

import torch

from memefx.schema import IMAGE, PAD, SPECIAL, TEXT

BLOCKS = ("text", "image", "cross", "special")


def indicators(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """(B, T) 0/1 vectors: text, image, special and non-pad positions."""
    return {
        "text": (segments == TEXT).to(dtype),
        "image": (segments == IMAGE).to(dtype),
        "special": (segments == SPECIAL).to(dtype),
        "nonpad": (segments != PAD).to(dtype),
    }


def block_operators(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The two small matrices ``fused_block_sums`` contracts a score tensor with.

    ``keys`` (B, T, 4): text, image, special, non-pad indicators of the key positions;
    ``queries`` (B, T, 4): text, image, special, text-or-image indicators of the query positions.
    """
    ind = indicators(segments, dtype)
    keys = torch.stack([ind["text"], ind["image"], ind["special"], ind["nonpad"]], dim=-1)
    queries = torch.stack([ind["text"], ind["image"], ind["special"], ind["text"] + ind["image"]], dim=-1)
    return keys, queries


def fused_block_sums(scores: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Block sums (B, H, 4) of ``scores`` (B, H, T, T) in one pass over the T x T entries.

    One batched matrix product reduces the key axis against the four key indicators; the query axis is
    then reduced on the small (B, H, T, 4) result: Z[q, k] = sum_ij queries_iq scores_ij keys_jk, and
    text = Z[t, t], image = Z[i, i], cross = Z[t, i] + Z[i, t], special = Z[s, nonpad] + Z[t+i, s].
    """
    b, h, t, _ = scores.shape
    by_key = torch.bmm(scores.reshape(b, h * t, t), keys.to(scores.dtype)).view(b, h, t, 4)
    z = torch.einsum("btq,bhtk->bhqk", queries.to(scores.dtype), by_key)
    return torch.stack([z[..., 0, 0], z[..., 1, 1], z[..., 0, 1] + z[..., 1, 0], z[..., 2, 3] + z[..., 3, 2]], dim=-1)


def block_sums(scores: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per sample and head, the sum of ``scores`` (B, H, T, T) over each block: (B, H, 4) in BLOCKS order."""
    return fused_block_sums(scores, *block_operators(segments, scores.dtype))


def block_counts(segments: torch.Tensor) -> torch.Tensor:
    """Entries per block and sample: (B, 4) in BLOCKS order (the denominators of block means)."""
    ind = indicators(segments, torch.float64)
    nt, ni, ns, nn = (ind[k].sum(-1) for k in ("text", "image", "special", "nonpad"))
    return torch.stack([nt * nt, ni * ni, 2 * nt * ni, nn * nn - (nt + ni) ** 2], dim=-1)


def block_masks(segments: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 4, T, T) masks of the blocks: a readable reference for tests and small inputs."""
    seg = segments
    q, k = seg[:, :, None], seg[:, None, :]
    nonpad = (q != PAD) & (k != PAD)
    text = (q == TEXT) & (k == TEXT)
    image = (q == IMAGE) & (k == IMAGE)
    cross = ((q == TEXT) & (k == IMAGE)) | ((q == IMAGE) & (k == TEXT))
    special = nonpad & ((q == SPECIAL) | (k == SPECIAL))
    return torch.stack([text, image, cross, special], dim=1)
