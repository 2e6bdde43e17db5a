"""The backbone adapter contract every model family implements (DESIGN.md, "Backbone contract").

An adapter takes a collated batch and returns logits, the per-token segment tensor of the *whole*
sequence the transformer sees (special / text / image / pad) and, when asked, the attention
probabilities of every layer as tensors that stay in the autograd graph, so MIDAS can take gradients
with respect to them. Only forwards asked for attentions run the eager attention path; every other
forward runs the adapter's ``attn_implementation`` (SDPA by default, see ``encoder.attention_path``).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn


@dataclass
class BackboneOutput:
    """logits (B, 2); segments (B, T); attentions: per layer (B, heads, T, T) or None."""

    logits: torch.Tensor
    segments: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None = None


class Backbone(nn.Module):
    """Base class: subclasses set ``num_layers``/``num_heads`` and implement ``forward``."""

    num_layers: int
    num_heads: int
    vocab_size: int

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError

    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of each layer, in order (targets of attention override hooks)."""
        return [layer.attention.self for layer in self.encoder.encoder.layer]


class ImageEncoder(nn.Module):
    """A timm model turned into a sequence of visual tokens (B, N, C).

    Built without pretrained weights; ``checkpoint`` loads a local state dict (never a hub download).
    CNN feature maps become H*W grid tokens; ViT-style outputs are used as they are.
    """

    def __init__(
        self,
        name: str = "test_vit",
        image_size: int = 64,
        checkpoint: str | None = None,
        freeze: bool = False,
        model_args: dict | None = None,
    ):
        super().__init__()
        args = dict(model_args or {})
        if name.startswith(("test_vit", "vit_", "deit_")):
            args.setdefault("img_size", image_size)
        self.model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **args)
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"{checkpoint}: unexpected keys for timm model {name!r}: {unexpected[:5]}")
        self.out_dim = int(self.model.num_features)
        if freeze:
            self.model.requires_grad_(False)
        self.frozen = freeze

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(pixel_values)
        if feats.dim() == 4:  # (B, C, H, W) grid -> (B, H*W, C)
            feats = feats.flatten(2).transpose(1, 2)
        return feats
