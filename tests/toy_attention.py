"""A hand-weighted one-layer attention classifier whose dF/dA is known in closed form.

Tokens carry fixed embeddings E; A = softmax(E Wq (E Wk)^T / sqrt(d)); context = A V with V = E Wv;
logit_hateful = u . context[0] ([CLS] row), logit_benign = 0. So F = p_hateful = sigmoid(u . (A V)_0) and
dF/dA[0, j] = F (1 - F) (u . V_j), while dF/dA[i, j] = 0 for every other query row i.
"""

from __future__ import annotations

import torch
from torch import nn

from memefx.models.backbones.base import Backbone, BackboneOutput


class ToySelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.query, self.key, self.value = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        for lin in (self.query, self.key, self.value):
            lin.weight.data = torch.randn(dim, dim, generator=g) / dim**0.5

    def forward(self, hidden, attention_mask=None, output_attentions=True):
        scores = self.query(hidden) @ self.key(hidden).transpose(1, 2) / hidden.shape[-1] ** 0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(-1)[:, None]  # one head: (B, 1, T, T)
        return (probs[:, 0] @ self.value(hidden), probs)


class ToyBackbone(Backbone):
    num_layers, num_heads = 1, 1

    def __init__(self, vocab: int = 20, dim: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.vocab_size = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.embed.weight.data = torch.randn(vocab, dim, generator=g)
        self.attn = ToySelfAttention(dim)
        self.u = nn.Parameter(torch.randn(dim, generator=g))

    def attention_modules(self):
        return [self.attn]

    def forward(self, batch, output_attentions=False):
        hidden = self.embed(batch["input_ids"])
        mask = (batch["attention_mask"][:, None, :] - 1.0) * 1e9
        context, probs = self.attn(hidden, attention_mask=mask)
        logit = context[:, 0] @ self.u
        logits = torch.stack([torch.zeros_like(logit), logit], dim=-1)
        return BackboneOutput(logits, batch["segments"], (probs,) if output_attentions else None)

    def closed_form_grad(self, batch) -> torch.Tensor:
        """dF/dA for F = p_hateful, from the formula above."""
        with torch.no_grad():
            out = self(batch)
            f = out.logits.softmax(-1)[:, 1]
            uv = self.attn.value(self.embed(batch["input_ids"])) @ self.u  # (B, T)
            grad = torch.zeros(len(f), 1, uv.shape[1], uv.shape[1])
            grad[:, 0, 0, :] = (f * (1 - f))[:, None] * uv
        return grad
