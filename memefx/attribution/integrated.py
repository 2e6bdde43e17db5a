"""AttAttr by integrated gradients (Hao et al., AAAI 2021), the reference MIDAS is validated against.

Attr(A_l) = A_l * integral_0^1 dF(alpha A_l)/dA_l d alpha, where only layer l's attention is scaled and
every other layer computes its own. Eval mode, right Riemann (k = 1..m) or Gauss-Legendre nodes, steps x
samples evaluated in chunks, and the completeness gap sum Attr - (F(A_l) - F(0 A_l)) reported.
Unlike the reference code: the layer's *own* attention is scaled, alpha = 1 is included, dropout is off,
and nothing is normalized across samples.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from memefx.attribution.capture import attention_override
from memefx.attribution.masks import block_sums
from memefx.attribution.midas import target_classes


class AttentionModel(Protocol):
    """What the reference needs of a model (a memefx backbone adapter fits): called on a batch with
    ``output_attentions=True`` it returns ``logits``, ``segments`` and per-layer ``attentions``."""

    training: bool

    def __call__(self, batch: dict, output_attentions: bool = False): ...

    def attention_modules(self) -> list[nn.Module]: ...

    def train(self, mode: bool = True): ...

    def eval(self): ...


def quadrature(steps: int, rule: Literal["riemann", "gauss"] = "riemann") -> tuple[np.ndarray, np.ndarray]:
    """Nodes alpha in (0, 1] and weights summing to 1."""
    if rule == "riemann":
        return np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2


def _repeat(batch: dict, times: int) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value.repeat(times, *([1] * (value.dim() - 1)))
        elif isinstance(value, list):
            out[key] = value * times
        else:
            out[key] = value
    return out


def _target_prob(model: AttentionModel, batch: dict, target: torch.Tensor) -> torch.Tensor:
    out = model(batch, output_attentions=True)
    return out.logits.float().softmax(-1).gather(1, target[:, None]).squeeze(1)


def integrated_attattr(model: AttentionModel, batch: dict, layer: int, steps: int = 20, target: str = "gold",
                       rule: Literal["riemann", "gauss"] = "riemann", chunk: int = 64,
                       full: bool = False) -> dict:
    """Integrated-gradient attribution of layer ``layer``'s attention for every sample of ``batch``.

    Returns ``block`` (B, H, 4) block sums of Attr, ``total`` (B,) sum of Attr, ``delta`` (B,) the
    completeness gap against F(A_l) - F(0 A_l) and, with ``full``, the attribution tensor itself.
    ``chunk`` bounds how many (step, sample) rows run through the model at once.
    """
    was_training = model.training
    model.eval()
    module = model.attention_modules()[layer]
    alphas, weights = quadrature(steps, rule)
    try:
        with torch.no_grad():
            out = model(batch, output_attentions=True)
            probs = out.logits.float().softmax(-1)
            tgt = target_classes(probs, batch["labels"], target)
            attention = out.attentions[layer].detach()
            segments = out.segments
            f_full = probs.gather(1, tgt[:, None]).squeeze(1)
            with attention_override(module, lambda a: a * 0.0):
                f_zero = _target_prob(model, batch, tgt)
        b = attention.shape[0]
        grad_sum = torch.zeros_like(attention, dtype=torch.float64)
        per = max(1, chunk // b)
        for start in range(0, steps, per):
            a_chunk = torch.as_tensor(alphas[start:start + per], dtype=attention.dtype)
            w_chunk = torch.as_tensor(weights[start:start + per], dtype=torch.float64)
            n = len(a_chunk)
            scale = a_chunk.repeat_interleave(b).view(-1, 1, 1, 1).to(attention.device)
            rep = _repeat(batch, n)

            def replace(a, scale=scale):
                return (a.detach() * scale).requires_grad_(True)

            with torch.enable_grad(), attention_override(module, replace) as store:
                f = _target_prob(model, rep, tgt.repeat(n))
                (grad,) = torch.autograd.grad(f.sum(), store["probs"])
            grad_sum += (grad.double().view(n, b, *grad.shape[1:]) * w_chunk.view(-1, 1, 1, 1, 1).to(grad.device)).sum(0)
        attr = attention.double() * grad_sum
        total = attr.sum(dim=(1, 2, 3))
        result = {
            "block": block_sums(attr, segments).cpu(),
            "total": total.cpu(),
            "delta": (total - (f_full - f_zero).double()).cpu(),
            "f_full": f_full.cpu(),
            "f_zero": f_zero.cpu(),
        }
        if full:
            result["attr"] = attr.cpu()
        return result
    finally:
        model.train(was_training)
