"""The BERT-family encoder every single-stream adapter builds on, and its attention path.

Encoders are built with a fast attention implementation (``sdpa`` by default). Attention probabilities
only come out of the eager path (transformers 5 returns nothing from SDPA), so a forward that captures
attentions switches that one forward to eager with ``attention_path`` and back again; every other
forward runs the fast kernel. The choice changes no parameter or buffer: checkpoints do not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel

from memefx.pretrained import minilm_path

ATTENTION_PATHS = ("sdpa", "eager")
POOLINGS = ("cls", "mean")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """The sequence summary the classifier reads: the [CLS] state (``cls``) or the mean of the states of the
    non-padding positions (``mean``, as sentence-transformers encoders are trained to be read)."""
    if how == "cls":
        return hidden[:, 0]
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def check_pooling(how: str) -> str:
    if how not in POOLINGS:
        raise ValueError(f"pooling={how!r}: expected one of {POOLINGS}")
    return how


def check_attention_path(name: str) -> str:
    """Refuse unknown attention implementations with the accepted names."""
    if name not in ATTENTION_PATHS:
        raise ValueError(f"attn_implementation={name!r}: expected one of {ATTENTION_PATHS} ('sdpa' runs the "
                         "fastest kernel PyTorch has for the device; 'eager' materializes every attention map)")
    return name


@contextmanager
def attention_path(config, capture: bool) -> Iterator[None]:
    """Within the block, a transformers ``config`` runs eager attention if ``capture``, else its own path.

    transformers 5 reads ``config._attn_implementation`` at every forward (attention function and mask
    format), so switching it for the duration of one forward is enough; it is restored in ``finally``.
    """
    previous = config._attn_implementation
    if not capture or previous == "eager":
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def bert_encoder(pretrained: str | None, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_position: int, dropout: float,
                 attn_implementation: str = "sdpa") -> nn.Module:
    """A BERT-family encoder: from a local folder (``minilm``: the packaged MiniLM), or randomly initialized
    with the given shape. Never downloads. ``attn_implementation`` is the path of forwards that capture
    nothing (see ``attention_path``)."""
    check_attention_path(attn_implementation)
    if pretrained:
        path = minilm_path() if pretrained == "minilm" else pretrained
        encoder = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
        return encoder.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attn_implementation=attn_implementation,
    )
    return BertModel(config, add_pooling_layer=False)
