"""Caption-pair encoder: any HF encoder over (meme text, image description) as a sentence pair.

The description is the image side: its tokens carry the ``IMAGE`` segment, so miATE and attention
blocks treat it as the image modality. Works on the real side tables, which have no pictures.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoModel, BertConfig, BertModel

from memefx.models.backbones.base import Backbone, BackboneOutput
from memefx.pretrained import minilm_path


def bert_encoder(pretrained: str | None, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_position: int, dropout: float) -> nn.Module:
    """A BERT-family encoder with eager attention: from a local folder (``minilm``: the packaged MiniLM),
    or randomly initialized with the given shape. Never downloads."""
    if pretrained:
        path = minilm_path() if pretrained == "minilm" else pretrained
        encoder = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
        return encoder.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attn_implementation="eager",
    )
    return BertModel(config, add_pooling_layer=False)


class CaptionPairBackbone(Backbone):
    """``[CLS] meme text [SEP] description [SEP]`` through a BERT-style encoder, [CLS] -> 2 logits.

    Args:
        pretrained: local folder of an HF encoder, or ``minilm`` for the packaged MiniLM; ``None`` builds
            a random BERT of the given shape (tests, synthetic data).
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position, dropout:
            the random encoder's shape.
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
    ):
        super().__init__()
        self.encoder = bert_encoder(pretrained, vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                                    max_position, dropout)
        cfg = self.encoder.config
        self.num_layers, self.num_heads, self.vocab_size = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size
        self.head = nn.Sequential(nn.Dropout(cfg.hidden_dropout_prob), nn.Linear(cfg.hidden_size, 2))

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:
        kwargs = {"token_type_ids": batch["token_type_ids"]} if self.encoder.config.type_vocab_size > 1 else {}
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_attentions=output_attentions, return_dict=True, **kwargs)
        cls = out.last_hidden_state[:, 0]
        return BackboneOutput(self.head(cls), batch["segments"], tuple(out.attentions) if output_attentions else None)


