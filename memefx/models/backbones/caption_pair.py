"""Caption-pair encoder: any HF encoder over (meme text, image description) as a sentence pair.

The description is the image side: its tokens carry the ``IMAGE`` segment, so miATE and attention
blocks treat it as the image modality. Works on the real side tables, which have no pictures.
"""

from __future__ import annotations

from torch import nn

from memefx.models.backbones.base import Backbone, BackboneOutput
from memefx.models.backbones.encoder import attention_path, bert_encoder, check_pooling, pool


class CaptionPairBackbone(Backbone):
    """``[CLS] meme text [SEP] description [SEP]`` through a BERT-style encoder, [CLS] (or mean) -> 2 logits.

    Args:
        pretrained: local folder of an HF encoder, or ``minilm`` for the packaged MiniLM; ``None`` builds
            a random BERT of the given shape (tests, synthetic data).
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position, dropout:
            the random encoder's shape.
        attn_implementation: attention of forwards that capture nothing (``sdpa``, or ``eager``);
            forwards asked for attentions always run eager.
        pooling: what the linear head reads: the [CLS] state (``cls``) or the mean over the non-padding
            tokens (``mean``: how sentence encoders such as the packaged MiniLM were trained to be read).
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
        attn_implementation: str = "sdpa",
        pooling: str = "cls",
    ):
        super().__init__()
        self.pooling = check_pooling(pooling)
        self.encoder = bert_encoder(pretrained, vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                                    max_position, dropout, attn_implementation)
        cfg = self.encoder.config
        self.num_layers, self.num_heads, self.vocab_size = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size
        self.head = nn.Sequential(nn.Dropout(cfg.hidden_dropout_prob), nn.Linear(cfg.hidden_size, 2))

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:
        kwargs = {"token_type_ids": batch["token_type_ids"]} if self.encoder.config.type_vocab_size > 1 else {}
        with attention_path(self.encoder.config, output_attentions):
            out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_attentions=output_attentions, return_dict=True, **kwargs)
        summary = pool(out.last_hidden_state, batch["attention_mask"], self.pooling)
        return BackboneOutput(self.head(summary), batch["segments"], tuple(out.attentions) if output_attentions else None)
