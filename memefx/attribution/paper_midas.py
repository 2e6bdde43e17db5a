"""The paper's own MIDAS procedure (Vilio ``hm.py --extract_type attattr|gradient``), kept reachable to
compare with: memefx's MIDAS (``attribution/midas.py``) and AttAttr reference (``integrated.py``) fix its
defects, and this module reproduces it so the two can be put side by side (docs/method.md, section 6).

What the reference computes for a batch:

1. A = the **last** layer's attention of an eval forward.
2. For alpha = 0, 1/m, ..., (m-1)/m (``scaled_input`` makes m + 1 steps, the loop uses the first m: alpha = 1
   never, alpha = 0 always), rerun the model with **every** layer's attention probabilities replaced by the
   one tensor alpha * A, and take the gradient of the target with respect to that shared tensor.
3. ``gradient`` = the sum of those m gradients; ``attattr`` = A * minmax(gradient) / m, where the min-max runs
   over consecutive groups of ``norm_size`` batch rows (all heads and positions together).

The reference's target is the sum over hidden units of ``softmax(pooled_output)``, identically 1, so its
gradient is rounding noise (``target="pooled_softmax_sum"``, Vilio backbones only). ``target="hateful"``
puts the hateful probability in its place (what the oracle's ``ig_cls1_*`` tensors record). The reference
also ran step 2 in train mode (dropout on, unseeded); this runs it in eval mode.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal

import torch

from memefx.attribution.capture import attention_override
from memefx.attribution.integrated import AttentionModel

TARGETS = ("pooled_softmax_sum", "hateful")


def minmax_groups(values: torch.Tensor, size: int = 2) -> torch.Tensor:
    """The reference's ``min_max_scaler``: each group of ``size`` consecutive rows scaled to [0, 1] jointly."""
    if values.shape[0] % size:
        raise ValueError(f"minmax_groups: {values.shape[0]} rows do not split into groups of {size} "
                         "(the reference asserts the batch size is a multiple of --conf_unit_size)")
    groups = values.reshape(values.shape[0] // size, -1)
    low, high = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    return ((groups - low) / (high - low)).reshape(values.shape)


def _target(model: AttentionModel, out, kind: str, pooled: list[torch.Tensor]) -> torch.Tensor:
    if kind == "hateful":
        return out.logits.softmax(-1)[:, 1].sum()
    return pooled[-1].softmax(-1).sum()  # Σ_b Σ_j softmax(pooled_b)_j: every sample's term is 1


def paper_midas(model: AttentionModel, batch: dict, steps: int = 10,
                target: Literal["pooled_softmax_sum", "hateful"] = "pooled_softmax_sum", norm_size: int = 2) -> dict:
    """The reference's MIDAS tensors for ``batch``: ``attention`` (the last layer's A), ``gradient`` (summed
    over the m steps), ``attattr`` (A * minmax(gradient) / m) and ``alphas``; all (B, H, T, T) but alphas."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}")
    pooler = getattr(getattr(model, "model", None), "pooler", None)
    if target == "pooled_softmax_sum" and pooler is None:
        raise ValueError("target='pooled_softmax_sum' needs a model with a BERT pooler (the Vilio backbones)")
    was_training = model.training
    model.eval()
    modules = model.attention_modules()
    pooled: list[torch.Tensor] = []
    handle = pooler.register_forward_hook(lambda _m, _a, out: pooled.append(out)) if pooler is not None else None
    try:
        with torch.no_grad():
            attention = model(batch, output_attentions=True).attentions[-1].detach()
        alphas = torch.arange(steps, dtype=attention.dtype) / steps
        gradient = torch.zeros_like(attention)
        for alpha in alphas:
            shared = (alpha * attention).requires_grad_(True)
            with torch.enable_grad(), ExitStack() as stack:
                for module in modules:  # the same tensor stands in for every layer's attention
                    stack.enter_context(attention_override(module, lambda _a, shared=shared: shared))
                out = model(batch, output_attentions=True)
                (grad,) = torch.autograd.grad(_target(model, out, target, pooled), shared)
            gradient += grad
        return {"attention": attention, "gradient": gradient, "alphas": alphas,
                "attattr": attention * minmax_groups(gradient, norm_size) / steps}
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
