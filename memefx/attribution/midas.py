"""MIDAS reductions (SPEC section 3): per sample, layer, head and block, the sum and entry count of the
attention, its gradient and their product; tables, summaries and stratum-level differences.

Everything here is pure (tensors and frames in, tensors and frames out); the Lightning callback only
collects the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import pandas as pd
import torch

from memefx.attribution.masks import BLOCKS, block_counts, block_operators, block_sums, fused_block_sums

SCORES = ("attention", "gradient", "attattr")
TARGETS = ("gold", "pred", "hateful")


def target_classes(probs: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """Class whose probability is attributed: gold label (pred where unlabeled), prediction, or hateful."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {TARGETS}")
    if target == "hateful":
        return torch.ones_like(labels)
    pred = probs.argmax(-1)
    return pred if target == "pred" else torch.where(labels >= 0, labels, pred)


def loss_grad_factor(p_gold: torch.Tensor, batch_size: int, loss_scale: float = 1.0,
                     accumulate: int = 1) -> torch.Tensor:
    """Per-sample factor turning dLoss/dA_b into dp_y(b)/dA_b (see ``prob_grad_from_loss_grad``)."""
    return -(batch_size * accumulate / loss_scale) * p_gold


def prob_grad_from_loss_grad(loss_grad: torch.Tensor, p_gold: torch.Tensor, batch_size: int,
                             loss_scale: float = 1.0, accumulate: int = 1) -> torch.Tensor:
    """dp_y(b)/dA_b from the gradient of the mean cross-entropy that training already computed.

    With loss = (1/B) sum_b -log p_y(b) (divided by ``accumulate`` under gradient accumulation and
    multiplied by ``loss_scale`` under AMP), dLoss/dA_b = -loss_scale / (accumulate * B * p_y(b))
    * dp_y(b)/dA_b, because sample b's attention reaches only sample b's loss term.
    """
    factor = loss_grad_factor(p_gold, batch_size, loss_scale, accumulate)
    return loss_grad * factor.view(-1, *([1] * (loss_grad.dim() - 1))).to(loss_grad.dtype)


def reduce_layers(attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], segments: torch.Tensor,
                  scores: Sequence[str] = SCORES) -> dict[str, torch.Tensor]:
    """Block sums per score type: {score: (B, L, H, 4)} on the CPU in float64, plus ``count`` (B, 4).

    Only these small tensors survive; the T x T inputs can be freed right after.
    """
    out: dict[str, list[torch.Tensor]] = {s: [] for s in scores}
    with torch.no_grad():
        for att, grad in zip(attentions, grads, strict=True):
            att, grad = att.detach().double(), grad.detach().double()
            parts = {"attention": att, "gradient": grad, "attattr": att * grad}
            for s in scores:
                out[s].append(block_sums(parts[s], segments).cpu())
    result = {s: torch.stack(v, dim=1) for s, v in out.items()}
    result["count"] = block_counts(segments).cpu()
    return result


class BackwardBlockReducer:
    """Reduce captured attention maps and their gradients to block sums *inside* the backward pass.

    A tensor hook on each attention map receives dOutput/dA the moment autograd computes it, reduces A, G
    and A * G of that layer to (B, H, 4) block sums in one fused pass each, and leaves the gradient as it
    is. Nothing is retained or copied (``retain_grad`` would clone every layer's gradient and keep all of
    them until the step ends), the T x T tensors never outlive the backward, and the sums stay on the
    device. Call ``remove`` when done (also after an exception); ``result`` says which layers got none.

    Args:
        attentions: the attention maps (B, H, T, T) of the layers to keep, in the autograd graph.
        segments: (B, T) segment ids of the sequence those maps cover.
        scores: subset of SCORES to reduce.
    """

    def __init__(self, attentions: Sequence[torch.Tensor], segments: torch.Tensor, scores: Sequence[str] = SCORES):
        unknown = set(scores) - set(SCORES)
        if unknown:
            raise ValueError(f"scores {sorted(unknown)}: expected a subset of {SCORES}")
        self.scores = tuple(scores)
        self._attentions = list(attentions)
        self._operators = block_operators(segments, self._attentions[0].dtype)
        self._count = block_counts(segments)
        self._sums: list[dict[str, torch.Tensor] | None] = [None] * len(self._attentions)
        self._handles = [a.register_hook(partial(self._reduce, k)) for k, a in enumerate(self._attentions)]

    def _reduce(self, k: int, grad: torch.Tensor) -> None:
        with torch.no_grad(), torch.profiler.record_function("midas.block_sums"):
            att = self._attentions[k].detach()
            parts = {"attention": lambda: att, "gradient": lambda: grad, "attattr": lambda: att * grad}
            self._sums[k] = {s: fused_block_sums(parts[s](), *self._operators) for s in self.scores}

    def result(self, sample_factor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{score: (B, L, H, 4)} and ``count`` (B, 4), on the attentions' device.

        ``sample_factor`` (B,) multiplies the gradient-based scores per sample (exact, being linear in G):
        the rescaling of a loss gradient into a probability gradient (``prob_grad_from_loss_grad``).
        """
        missing = [k for k, v in enumerate(self._sums) if v is None]
        if missing:
            raise RuntimeError(f"MIDAS: attention maps at positions {missing} got no gradient in the backward "
                               "(are they part of the graph that produced the differentiated output?)")
        out = {s: torch.stack([v[s] for v in self._sums], dim=1) for s in self.scores}
        if sample_factor is not None:
            factor = sample_factor.view(-1, 1, 1, 1)
            out.update({s: out[s] * factor.to(out[s].dtype) for s in ("gradient", "attattr") if s in out})
        out["count"] = self._count
        return out

    def remove(self) -> None:
        """Remove the hooks and drop the references to the attention maps."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._attentions = [], []


def _strings(values: Sequence[str], codes: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """``values[codes]`` as a pandas string array, without one Python string per row (fast for long tables)."""
    return pd.array(np.asarray(list(values), dtype=object), dtype="str").take(codes)


def to_table(ids: Sequence[str], reduced: dict[str, np.ndarray | torch.Tensor], epoch: int, stage: str,
             layers: Sequence[int]) -> pd.DataFrame:
    """Long table: id, epoch, stage, layer, head, block, score, sum, count (one row per entry).

    Rows run over scores (SCORES order), then samples, layers, heads and blocks.
    """
    scores = [s for s in SCORES if s in reduced]
    if not scores:
        return pd.DataFrame()
    counts = np.asarray(reduced["count"])
    sums = np.stack([np.asarray(reduced[s]) for s in scores])  # (S, N, L, H, 4)
    idx = np.indices(sums.shape).reshape(5, -1)
    return pd.DataFrame({
        "id": _strings(ids, idx[1]), "epoch": np.full(idx.shape[1], epoch, dtype=np.int64),
        "stage": _strings([stage], np.zeros(idx.shape[1], dtype=np.int64)), "layer": np.asarray(layers)[idx[2]],
        "head": idx[3], "block": _strings(BLOCKS, idx[4]), "score": _strings(scores, idx[0]),
        "sum": sums.reshape(-1), "count": counts[idx[1], idx[4]],
    })


def block_summary(table: pd.DataFrame, by: Sequence[str] = ("stage", "epoch", "score", "block")) -> pd.DataFrame:
    """Block means pooled as sums of sums over sums of counts (never a mean of ratios)."""
    grouped = table.groupby(list(by), sort=True)[["sum", "count"]].sum().reset_index()
    grouped["mean"] = grouped["sum"] / grouped["count"].where(grouped["count"] > 0)
    return grouped


def sample_block_means(table: pd.DataFrame, score: str = "attattr") -> pd.DataFrame:
    """Per sample: block mean over all layers and heads, one column per block."""
    rows = table[table.score == score]
    pooled = rows.groupby(["id", "block"])[["sum", "count"]].sum()
    means = (pooled["sum"] / pooled["count"].where(pooled["count"] > 0)).unstack("block")
    return means.reindex(columns=list(BLOCKS))


def stratum_midas(means: pd.DataFrame, members: pd.DataFrame) -> pd.DataFrame:
    """Stratum-level MIDAS: mean block score over hateful members minus over benign members.

    ``members`` has columns id, stratum, label (e.g. from ``strata_members``); ``means`` is indexed by id.
    """
    rows = members[["id", "stratum", "label"]].merge(means, left_on="id", right_index=True)
    pos = rows[rows.label == 1].groupby("stratum")[list(BLOCKS)].mean()
    neg = rows[rows.label == 0].groupby("stratum")[list(BLOCKS)].mean()
    return (pos - neg).dropna(how="all")
