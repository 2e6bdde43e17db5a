"""VisualBERT (transformers) over text tokens followed by timm visual tokens.

transformers' VisualBERT self-attention has only the eager path; memefx gives it an SDPA path for the
forwards that return no attention map (same parameters, so checkpoints do not depend on the path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import VisualBertConfig, VisualBertModel
from transformers.models.visual_bert.modeling_visual_bert import VisualBertSelfAttention

from memefx.models.backbones.base import Backbone, BackboneOutput, ImageEncoder
from memefx.models.backbones.encoder import check_attention_path
from memefx.schema import IMAGE


class FastVisualBertSelfAttention(VisualBertSelfAttention):
    """VisualBERT self-attention that runs ``scaled_dot_product_attention`` unless asked for its map.

    Adds no parameter; ``use_sdpa`` False keeps transformers' eager path for every forward.
    """

    use_sdpa: bool = True

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if output_attentions or not self.use_sdpa:
            return super().forward(hidden_states, attention_mask, output_attentions)
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query, key, value = (proj(hidden_states).view(shape).transpose(1, 2)
                             for proj in (self.query, self.key, self.value))
        mask = attention_mask.to(query.dtype) if attention_mask is not None else None  # additive, as in eager
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                 dropout_p=self.dropout.p if self.training else 0.0)
        return (context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size),)


class VisualBertBackbone(Backbone):
    """Single-stream VisualBERT: ``[CLS] text [SEP] [PAD]... v_1 ... v_N``.

    Args:
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position, dropout:
            shape of a randomly initialized encoder (ignored when ``pretrained`` is given).
        pretrained: local folder of a VisualBERT checkpoint (``from_pretrained``, local files only).
        image_encoder, image_size, image_checkpoint, freeze_image_encoder, image_encoder_args:
            the timm model that turns pixels into visual tokens.
        attn_implementation: attention of forwards that capture nothing (``sdpa``, or ``eager``);
            forwards asked for attentions always run eager.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 256,
        max_position: int = 128,
        dropout: float = 0.1,
        pretrained: str | None = None,
        image_encoder: str = "test_vit",
        image_size: int = 64,
        image_checkpoint: str | None = None,
        freeze_image_encoder: bool = False,
        image_encoder_args: dict | None = None,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        check_attention_path(attn_implementation)
        self.image_encoder = ImageEncoder(image_encoder, image_size, image_checkpoint, freeze_image_encoder,
                                          image_encoder_args)
        if pretrained:
            self.encoder = VisualBertModel.from_pretrained(pretrained, local_files_only=True,
                                                           attn_implementation="eager")
            self.encoder.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
            self.visual_adapter = nn.Linear(self.image_encoder.out_dim, self.encoder.config.visual_embedding_dim)
        else:
            config = VisualBertConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, intermediate_size=intermediate_size,
                max_position_embeddings=max_position, visual_embedding_dim=self.image_encoder.out_dim,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            )
            config._attn_implementation = "eager"  # VisualBERT's mask format; the SDPA path reads it as it is
            self.encoder = VisualBertModel(config)
            self.visual_adapter = nn.Identity()
        for module in self.attention_modules():
            module.__class__ = FastVisualBertSelfAttention  # a subclass without new state: same state dict
            module.use_sdpa = attn_implementation == "sdpa"
        cfg = self.encoder.config
        self.num_layers, self.num_heads, self.vocab_size = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size
        self.head = nn.Sequential(nn.Dropout(cfg.hidden_dropout_prob), nn.Linear(cfg.hidden_size, 2))

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:
        visual = self.visual_adapter(self.image_encoder(batch["pixel_values"]))
        b, n = visual.shape[:2]
        visual_mask = torch.ones(b, n, dtype=batch["attention_mask"].dtype, device=visual.device)
        out = self.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], visual_embeds=visual, visual_attention_mask=visual_mask,
            output_attentions=output_attentions, return_dict=True,
        )
        segments = torch.cat([batch["segments"], torch.full((b, n), IMAGE, dtype=batch["segments"].dtype,
                                                             device=visual.device)], dim=1)
        return BackboneOutput(self.head(out.pooler_output), segments,
                              tuple(out.attentions) if output_attentions else None)
