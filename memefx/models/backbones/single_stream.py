"""UNITER- and OSCAR-style single-stream encoders: a BERT over text tokens followed by visual tokens.

Visual tokens are projected region or grid features plus a projected 7-d box (x1, y1, x2, y2, w, h, area),
with token type 1, as in UNITER. OSCAR-style adds object-tag words as a second text segment
(``[CLS] text [SEP] tags [SEP] v_1 ... v_N``); the tags describe the picture, so their tokens carry the
IMAGE segment. Visual inputs are either pixels through a timm encoder (grid cells become regions) or
precomputed region features from disk (``region_features`` / ``region_boxes`` / ``region_mask`` in the batch).
"""

from __future__ import annotations

import torch
from torch import nn

from memefx.models.backbones.base import Backbone, BackboneOutput, ImageEncoder
from memefx.models.backbones.encoder import attention_path, bert_encoder, check_pooling, pool
from memefx.schema import IMAGE, PAD


def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) normalized x1, y1, x2, y2 -> (…, 7) with width, height and area appended."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)


def grid_boxes(n_tokens: int, device=None) -> torch.Tensor:
    """Normalized boxes of a square grid of ``n_tokens`` cells (a leading class token gets the whole image)."""
    side = int(round(n_tokens**0.5))
    extra = n_tokens - side * side
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = torch.stack([xs, ys, xs + 1, ys + 1], dim=-1).reshape(-1, 4).float() / max(side, 1)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(extra, 1)
    return torch.cat([whole, cells]).to(device)


class SingleStreamBackbone(Backbone):
    """UNITER-style single stream (``use_tags=False``) or OSCAR-style (``use_tags=True``).

    Args:
        pretrained: local folder of a BERT-family encoder, ``minilm`` for the packaged MiniLM, or ``None``
            for a random BERT of the given shape.
        visual: ``pixels`` (timm grid features) or ``regions`` (precomputed features from the batch).
        region_dim: feature size of precomputed regions (2048 for the Faster R-CNN features HMC used).
        use_tags: expect object tags as the second text segment (OSCAR).
        attn_implementation: attention of forwards that capture nothing (``sdpa``, or ``eager``);
            forwards asked for attentions always run eager.
        pooling: what the linear head reads: the [CLS] state (``cls``) or the mean over the non-padding
            text and visual tokens (``mean``).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 256,
        max_position: int = 256,
        dropout: float = 0.1,
        visual: str = "pixels",
        region_dim: int = 2048,
        image_encoder: str = "test_vit",
        image_size: int = 64,
        image_checkpoint: str | None = None,
        freeze_image_encoder: bool = False,
        image_encoder_args: dict | None = None,
        use_tags: bool = False,
        attn_implementation: str = "sdpa",
        pooling: str = "cls",
    ):
        super().__init__()
        self.pooling = check_pooling(pooling)
        if visual not in ("pixels", "regions"):
            raise ValueError(f"visual={visual!r}: expected 'pixels' or 'regions'")
        self.encoder = bert_encoder(pretrained, vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                                    max_position, dropout, attn_implementation)
        cfg = self.encoder.config
        self.num_layers, self.num_heads, self.vocab_size = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size
        self.visual, self.use_tags = visual, use_tags
        self.image_encoder = None
        if visual == "pixels":
            self.image_encoder = ImageEncoder(image_encoder, image_size, image_checkpoint, freeze_image_encoder,
                                              image_encoder_args)
            region_dim = self.image_encoder.out_dim
        self.feature_proj = nn.Sequential(nn.Linear(region_dim, cfg.hidden_size), nn.LayerNorm(cfg.hidden_size))
        self.box_proj = nn.Sequential(nn.Linear(7, cfg.hidden_size), nn.LayerNorm(cfg.hidden_size))
        self.head = nn.Sequential(nn.Dropout(cfg.hidden_dropout_prob), nn.Linear(cfg.hidden_size, 2))

    def _visual_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.visual == "pixels":
            feats = self.image_encoder(batch["pixel_values"])
            boxes = grid_boxes(feats.shape[1], feats.device).expand(feats.shape[0], -1, -1)
            mask = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
        else:
            if "region_features" not in batch:
                raise ValueError("visual='regions' needs region features: set data.region_features to their folder")
            feats, boxes, mask = batch["region_features"], batch["region_boxes"], batch["region_mask"]
        return self.feature_proj(feats) + self.box_proj(box_features(boxes)), mask

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:
        if self.use_tags and not (batch["segments"] == IMAGE).any():
            raise ValueError("use_tags=True but the batch has no tag segment: set data.tags_file")
        visual, visual_mask = self._visual_tokens(batch)
        words = self.encoder.embeddings.word_embeddings(batch["input_ids"])
        b, t = batch["input_ids"].shape
        n = visual.shape[1]
        device = words.device
        embeds = torch.cat([words, visual.to(words.dtype)], dim=1)
        token_types = torch.cat([batch["token_type_ids"], torch.ones(b, n, dtype=torch.long, device=device)], dim=1)
        positions = torch.cat([torch.arange(t, device=device).expand(b, -1), torch.zeros(b, n, dtype=torch.long, device=device)], dim=1)
        mask = torch.cat([batch["attention_mask"], visual_mask.to(batch["attention_mask"].dtype)], dim=1)
        with attention_path(self.encoder.config, output_attentions):
            out = self.encoder(inputs_embeds=embeds, token_type_ids=token_types, position_ids=positions,
                               attention_mask=mask, output_attentions=output_attentions, return_dict=True)
        segments = torch.cat([batch["segments"], torch.where(visual_mask.bool(), IMAGE, PAD).to(batch["segments"].dtype)], dim=1)
        return BackboneOutput(self.head(pool(out.last_hidden_state, mask, self.pooling)), segments,
                              tuple(out.attentions) if output_attentions else None)
