"""Attention override hooks: replace one layer's attention probabilities by a given function of them.

Used by the integrated-gradient reference (layer l's attention becomes alpha * A_l while every other
layer computes its own). Works on any self-attention module whose forward takes the hidden states first,
returns ``(context, probs, ...)`` and has a ``value`` projection (BERT, VisualBERT and the memefx
adapters built on them). Hooks are removed in ``finally``, also when an exception passes through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _override_hook(replace: Callable[[torch.Tensor], torch.Tensor], store: dict):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        probs = output[1]
        if probs is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention probabilities; call the model "
                               "with output_attentions=True under an attention override")
        new_probs = replace(probs)
        store["probs"] = new_probs
        b, heads, t, _ = new_probs.shape
        value = module.value(hidden).view(b, t, heads, -1).transpose(1, 2)
        context = torch.matmul(new_probs.to(value.dtype), value).transpose(1, 2).reshape(b, t, -1)
        return (context, new_probs, *output[2:])

    return hook


@contextmanager
def attention_override(module: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict]:
    """Within the block, ``module``'s attention is ``replace(A)``; yields a dict whose ``probs`` entry is
    the replacement tensor of the last forward (a graph node to take gradients against)."""
    store: dict = {}
    handle = module.register_forward_hook(_override_hook(replace, store), with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def active_hooks(model: nn.Module) -> int:
    """Number of forward hooks registered anywhere in ``model`` (tests assert none leak)."""
    return sum(len(m._forward_hooks) for m in model.modules())
