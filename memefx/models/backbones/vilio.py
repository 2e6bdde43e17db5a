"""The paper's own models: Vilio's UNITER (U), OSCAR (O) and VisualBERT (V), computed as Vilio computes them.

Each adapter reproduces the reference forward of the Vilio framework the paper fine-tuned (embedding
composition, token order, masks, encoder, pooler, classifier) over precomputed region features, and keeps
Vilio's parameter names (``model.*``, ``classifier.*``) so its checkpoints load strictly. The families:

- **U** (``BertU``): ``[CLS] text [SEP]`` then the regions *gathered* right after each sample's own text (no
  padding between them); regions embedded as ``LN(LN(W f) + LN(W_pos box7) + type(1))``; pooled [CLS] ->
  ``Linear-GeLU-LayerNorm-Linear``.
- **O** (``BertO``): text padded to ``max_seq_len``, then ``Linear(cat(f, box4))`` per region (no LayerNorm, no
  position, no type, no object tags); pooled [CLS] -> ``Linear-GeLU-LayerNorm-Linear``.
- **V** (``BertV --reg``): text padded to ``max_seq_len``, regions ``projection(f) + pos_visual(0) +
  type_visual(1)`` (boxes unused), one LayerNorm over all tokens; the classifier reads a learned softmax
  average of the [CLS] state over the embedding output and every layer, with 5-sample dropout.

The encoder is transformers' BERT layer stack (post-LN, erf GeLU) fed an additive ``(1 - mask) * -10000``
mask, as Vilio's was; forwards that capture nothing run SDPA, the ones MIDAS reads run eager.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder, BertPooler

from memefx.models.backbones.base import Backbone, BackboneOutput
from memefx.models.backbones.encoder import attention_path, check_attention_path
from memefx.models.backbones.single_stream import box_features
from memefx.models.backbones.vilio_checkpoint import load_vilio_checkpoint
from memefx.schema import IMAGE, PAD

REGION_DIM = 2048  # Faster R-CNN features of the HMC region files


def vilio_config(bert: str | None, shape: dict, hidden_dropout: float | None = None,
                 attn_implementation: str = "sdpa") -> BertConfig:
    """The BERT config Vilio's ``--tr`` gives: ``config.json`` of the local folder ``bert`` (never a hub
    id), or, without a folder, a random BERT of the ``shape`` given (tests, training from scratch)."""
    check_attention_path(attn_implementation)
    if bert:
        folder = Path(bert)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.backbone_args.bert={bert!r}: no config.json there; give a local BERT "
                                    "folder (bert-large-cased for U, bert-large-uncased for O, bert-base-uncased "
                                    "for V), as Vilio's --tr names it")
        config = BertConfig.from_pretrained(folder, local_files_only=True)
        given = {k: v for k, v in shape.items() if v is not None}
        if given:
            raise ValueError(f"model.backbone_args: {sorted(given)} set together with bert={bert!r}; the shape "
                             "comes from the folder's config.json")
    else:
        missing = [k for k in ("hidden_size", "num_layers", "num_heads") if shape.get(k) is None]
        if missing:
            raise ValueError("model.backbone_args.bert is required: a local BERT folder whose config.json gives the "
                             f"shape (or, for a random model, set {missing} and the other shape keys)")
        config = BertConfig(
            vocab_size=shape.get("vocab_size") or 30522, hidden_size=shape["hidden_size"],
            num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
            intermediate_size=shape.get("intermediate_size") or 4 * shape["hidden_size"],
            max_position_embeddings=shape.get("max_position") or 512,
            hidden_dropout_prob=0.1 if shape.get("dropout") is None else shape["dropout"],
            attention_probs_dropout_prob=0.1 if shape.get("dropout") is None else shape["dropout"],
        )
    config.hidden_act = "gelu"  # Vilio sets it: exact (erf) GeLU
    if hidden_dropout is not None:
        config.hidden_dropout_prob = hidden_dropout
    config._attn_implementation = attn_implementation
    return config


class TextEmbeddings(nn.Module):
    """BERT word + position + token-type embeddings with Vilio's persistent ``position_ids`` buffer.

    ``normalize`` False returns the plain sum (VisualBERT normalizes text and regions together)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        out = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(out)) if normalize else out


class UniterImageEmbeddings(nn.Module):
    """UNITER's region embedding: ``LN(LN(W f) + LN(W_pos box7) + type)``, then dropout."""

    def __init__(self, config: BertConfig, region_dim: int = REGION_DIM):
        super().__init__()
        self.img_linear = nn.Linear(region_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, feats: torch.Tensor, box7: torch.Tensor, type_embeddings: torch.Tensor) -> torch.Tensor:
        out = self.img_layer_norm(self.img_linear(feats)) + self.pos_layer_norm(self.pos_linear(box7)) + type_embeddings
        return self.dropout(self.LayerNorm(out))


class VisioLinguisticEmbeddings(TextEmbeddings):
    """VisualBERT's embeddings: text tables plus visual type/position tables and a feature projection."""

    def __init__(self, config: BertConfig, region_dim: int = REGION_DIM):
        super().__init__(config)
        self.token_type_embeddings_visual = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.position_embeddings_visual = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.projection = nn.Linear(region_dim, config.hidden_size)


class VilioModel(nn.Module):
    """The ``model.*`` part of a Vilio checkpoint: embeddings, BERT encoder, pooler (+ family parts)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)


def lxmert_classifier(hidden: int) -> nn.Sequential:
    """U and O: ``Linear(H, 2H) - GeLU - LayerNorm(2H) - Linear(2H, 2)`` (keys classifier.0/2/3)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=1e-12),
                         nn.Linear(2 * hidden, 2))


def pad_text(batch: dict, length: int) -> tuple[torch.Tensor, ...]:
    """Text ids, mask, token types and segments right-padded with 0/PAD to ``length`` (Vilio's O and V
    pad every text to ``max_seq_len``); a longer text is an error naming both lengths."""
    ids, mask, types, segments = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["segments"]
    extra = length - ids.shape[1]
    if extra < 0:
        raise ValueError(f"a text of {ids.shape[1]} tokens exceeds the model's max_seq_len={length}: set "
                         f"data.max_length <= {length} (Vilio truncates texts to max_seq_len tokens)")
    pad = (0, extra)
    return (nn.functional.pad(ids, pad), nn.functional.pad(mask, pad), nn.functional.pad(types, pad),
            nn.functional.pad(segments, pad, value=PAD))


class VilioBackbone(Backbone):
    """Shared machinery of the three Vilio families: config, checkpoint, masks, capture, segments.

    Args:
        bert: local BERT folder whose ``config.json`` gives the shape (Vilio's ``--tr``); weights come from
            ``checkpoint`` or are random.
        checkpoint: a Vilio checkpoint (``hm.py`` layout or ``--swa`` layout), loaded strictly.
        max_seq_len: padded text length of O and V (Vilio's default 128; ``None``: 128 or the BERT's
            position count if smaller). U pads to the longest text of the batch, as Vilio does.
        region_dim: feature size of the regions (2048 for HMC's Faster R-CNN features).
        hidden_dropout: override of the config's hidden dropout (O: 0.3, as Vilio sets it).
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position, dropout: the shape
            of a random BERT when no ``bert`` folder is given.
        attn_implementation: attention of forwards that capture nothing (``sdpa``, or ``eager``).
    """

    family = ""
    default_hidden_dropout: float | None = None

    def __init__(
        self,
        bert: str | None = None,
        checkpoint: str | None = None,
        max_seq_len: int | None = None,
        region_dim: int = REGION_DIM,
        hidden_dropout: float | None = None,
        vocab_size: int | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position: int | None = None,
        dropout: float | None = None,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        shape = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers,
                 "num_heads": num_heads, "intermediate_size": intermediate_size, "max_position": max_position,
                 "dropout": dropout}
        dropout_override = self.default_hidden_dropout if hidden_dropout is None else hidden_dropout
        config = vilio_config(bert, shape, dropout_override, attn_implementation)
        self.config = config
        self.num_layers, self.num_heads, self.vocab_size = (config.num_hidden_layers, config.num_attention_heads,
                                                            config.vocab_size)
        self.max_seq_len = max_seq_len or min(128, config.max_position_embeddings)
        if self.max_seq_len > config.max_position_embeddings:
            raise ValueError(f"model.backbone_args.max_seq_len={self.max_seq_len} exceeds the BERT's "
                             f"{config.max_position_embeddings} position embeddings")
        self.model = self._build_model(config, region_dim)
        self.classifier = self._build_classifier(config)
        self.checkpoint_layout = load_vilio_checkpoint(self, checkpoint, self.family) if checkpoint else None

    # ------------------------------------------------------------------------------- family parts
    def _build_model(self, config: BertConfig, region_dim: int) -> VilioModel:  # pragma: no cover
        raise NotImplementedError

    def _build_classifier(self, config: BertConfig) -> nn.Module:
        return lxmert_classifier(config.hidden_size)

    def _embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover
        """(embedding output (B, T, H), 0/1 key mask (B, T), segments (B, T))."""
        raise NotImplementedError

    def _head(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Logits from the hidden states [embeddings, layer 1, ..., layer L]: the pooled [CLS] by default."""
        return self.classifier(self.model.pooler(hidden[-1]))

    # ------------------------------------------------------------------------------- shared path
    def attention_modules(self) -> list[nn.Module]:
        return [layer.attention.self for layer in self.model.encoder.layer]

    @staticmethod
    def _regions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "region_features" not in batch:
            raise ValueError("Vilio models read precomputed regions: set data.image_side=regions and "
                             "data.region_features to Vilio's TSV file (or a folder of <id>.npz)")
        return batch["region_features"], batch["region_boxes"], batch["region_mask"]

    def encode(self, embeddings: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False
               ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        """Run the layer stack; returns every hidden state (embedding output first) and, when asked, each
        layer's attention probabilities (graph nodes, for MIDAS)."""
        additive = (1.0 - mask[:, None, None, :].to(embeddings.dtype)) * -10000.0  # Vilio's extended mask
        captured: list[torch.Tensor] = []
        handles = [module.register_forward_hook(lambda _m, _a, out: captured.append(out[1]))
                   for module in self.attention_modules()] if output_attentions else []
        hidden = [embeddings]
        try:
            with attention_path(self.config, output_attentions):
                for layer in self.model.encoder.layer:
                    hidden.append(layer(hidden[-1], additive))
        finally:
            for handle in handles:
                handle.remove()
        return hidden, tuple(captured) if output_attentions else None

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:
        embeddings, mask, segments = self._embed(batch)
        hidden, attentions = self.encode(embeddings, mask, output_attentions)
        return BackboneOutput(self._head(hidden), segments, attentions)


class VilioUniterBackbone(VilioBackbone):
    """Vilio's UNITER (``--model U --tsv --num_pos 6``): regions gathered right after each sample's text."""

    family = "U"

    def _build_model(self, config: BertConfig, region_dim: int) -> VilioModel:
        model = VilioModel(config)
        model.img_embeddings = UniterImageEmbeddings(config, region_dim)
        return model

    def _embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, boxes, region_mask = self._regions(batch)
        ids = batch["input_ids"]
        text = self.model.embeddings(ids, torch.zeros_like(ids))
        type_one = self.model.embeddings.token_type_embeddings(torch.ones_like(region_mask))
        regions = self.model.img_embeddings(feats, box_features(boxes), type_one)
        index, mask = uniter_gather_index(batch["attention_mask"].sum(1), region_mask.sum(1), ids.shape[1],
                                          feats.shape[1])
        both = torch.cat([text, regions], dim=1)
        embeddings = torch.gather(both, 1, index[..., None].expand(-1, -1, both.shape[-1]))
        region_segments = torch.where(region_mask.bool(), IMAGE, PAD).to(batch["segments"].dtype)
        segments = torch.gather(torch.cat([batch["segments"], region_segments], 1), 1, index)
        segments = torch.where(mask.bool(), segments, torch.full_like(segments, PAD))
        return embeddings, mask, segments


def uniter_gather_index(text_lengths: torch.Tensor, region_counts: torch.Tensor, max_text: int, max_regions: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """UNITER's ``gather_index`` and key mask: row i takes its ``tl_i`` text positions, then its regions
    (stored after the ``max_text`` text slots); the tail keeps the identity index and mask 0.

    Output length is ``max_i (tl_i + nbb_i)`` (Vilio: ``max_tl + num_features`` with equal region counts)."""
    b = text_lengths.shape[0]
    length = int((text_lengths + region_counts).max())
    device = text_lengths.device
    index = torch.arange(length, device=device).repeat(b, 1)
    for i, (tl, nbb) in enumerate(zip(text_lengths.tolist(), region_counts.tolist())):
        index[i, tl: tl + nbb] = torch.arange(max_text, max_text + nbb, device=device)
    index = index.clamp(max=max_text + max_regions - 1)  # tail slots only ever hold masked copies
    mask = (torch.arange(length, device=device)[None] < (text_lengths + region_counts)[:, None]).long()
    return index, mask


class VilioOscarBackbone(VilioBackbone):
    """Vilio's OSCAR (``--model O --tsv``): text padded to ``max_seq_len``, then ``Linear(cat(f, box4))``."""

    family = "O"
    default_hidden_dropout = 0.3  # ModelO sets it on the config

    def _build_model(self, config: BertConfig, region_dim: int) -> VilioModel:
        model = VilioModel(config)
        model.img_embedding = nn.Linear(region_dim + 4, config.hidden_size)
        model.dropout = nn.Dropout(config.hidden_dropout_prob)
        return model

    def _embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, boxes, region_mask = self._regions(batch)
        ids, text_mask, types, text_segments = pad_text(batch, self.max_seq_len)
        text = self.model.embeddings(ids, types)
        regions = self.model.dropout(self.model.img_embedding(torch.cat([feats, boxes.to(feats.dtype)], dim=-1)))
        region_segments = torch.where(region_mask.bool(), IMAGE, PAD).to(text_segments.dtype)
        return (torch.cat([text, regions], 1), torch.cat([text_mask, region_mask.to(text_mask.dtype)], 1),
                torch.cat([text_segments, region_segments], 1))


class VilioVisualBertBackbone(VilioBackbone):
    """Vilio's VisualBERT (``--model V --reg``): boxes unused; classifier on a learned layer average of [CLS]."""

    family = "V"

    def _build_model(self, config: BertConfig, region_dim: int) -> VilioModel:
        model = VilioModel(config)
        model.embeddings = VisioLinguisticEmbeddings(config, region_dim)
        weights = torch.zeros(config.num_hidden_layers + 1)
        weights[:-1] = -3.0
        model.layer_weights = nn.Parameter(weights)
        model.dropout = nn.Dropout(0.2)
        # the classifier reads the layer average, never the pooler: it gets no gradient (as in Vilio's --reg
        # fine-tuning), and frozen it leaves DDP no unused parameter to wait for
        model.pooler.requires_grad_(False)
        return model

    def _build_classifier(self, config: BertConfig) -> nn.Module:
        self.high_dropout = nn.Dropout(0.5)
        return nn.Linear(config.hidden_size, 2)

    def _embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, _boxes, region_mask = self._regions(batch)  # VisualBERT ignores the boxes
        ids, text_mask, types, text_segments = pad_text(batch, self.max_seq_len)
        emb = self.model.embeddings
        text = emb(ids, types, normalize=False)
        zeros = torch.zeros_like(region_mask)
        regions = emb.projection(feats) + emb.position_embeddings_visual(zeros) + emb.token_type_embeddings_visual(zeros + 1)
        embeddings = emb.dropout(emb.LayerNorm(torch.cat([text, regions], 1)))
        region_segments = torch.where(region_mask.bool(), IMAGE, PAD).to(text_segments.dtype)
        return (embeddings, torch.cat([text_mask, region_mask.to(text_mask.dtype)], 1),
                torch.cat([text_segments, region_segments], 1))

    def _head(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        self.model.pooler(hidden[-1])  # computed but unused, as in BertV: the paper's MIDAS target reads it
        cls = torch.stack([self.model.dropout(h[:, 0]) for h in hidden], dim=2)  # (B, H, L + 1)
        averaged = (torch.softmax(self.model.layer_weights, dim=0) * cls).sum(-1)
        # multi-sample dropout: 5 calls, averaged (identical in eval mode, but the mean is what Vilio computes)
        return torch.stack([self.classifier(self.high_dropout(averaged)) for _ in range(5)], dim=0).mean(0)
