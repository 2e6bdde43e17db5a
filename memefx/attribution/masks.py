"""Attention blocks from the segment tensor (SPEC section 3).

For queries i and keys j of one sample: ``text`` = text x text, ``image`` = image x image,
``cross`` = text x image + image x text, ``special`` = every non-pad entry whose row or column is a
special token. Pad rows and columns belong to no block, so the four blocks partition the non-pad entries.
Block sums are computed as bilinear forms of indicator vectors, never by materializing T x T masks.
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


def _bilinear(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sum_ij rows_i * scores[b, h, i, j] * cols_j for every (b, h): (B, H)."""
    return torch.einsum("bi,bhij,bj->bh", rows, scores, cols)


def block_sums(scores: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per sample and head, the sum of ``scores`` (B, H, T, T) over each block: (B, H, 4) in BLOCKS order."""
    ind = indicators(segments, scores.dtype)
    t, i, s, n = ind["text"], ind["image"], ind["special"], ind["nonpad"]
    return torch.stack([
        _bilinear(scores, t, t),
        _bilinear(scores, i, i),
        _bilinear(scores, t, i) + _bilinear(scores, i, t),
        _bilinear(scores, s, n) + _bilinear(scores, t + i, s),  # special row, or special column
    ], dim=-1)


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
