"""Tokenization with a per-token segment tensor, and the batch collator.

Segments say which modality each position carries, which is what MIDAS splits attention by:
``SPECIAL`` ([CLS], [SEP], ...), ``TEXT``, ``IMAGE`` (region/patch tokens or description tokens) and
``PAD``. They come from the fast tokenizer's own ``sequence_ids`` (no string matching, no off-by-one on
[SEP]).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from memefx.schema import IMAGE, PAD, SEGMENT_NAMES, SPECIAL, STRATUM_COLUMN, TEXT  # noqa: F401  (re-exported)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Build a lower-casing BERT-style WordPiece tokenizer from ``texts``, offline and deterministic.

    The vocabulary is every character (word-initial and ``##`` continuation) plus the most frequent
    whole words, ties broken alphabetically, so the same texts give the same ids on every run (the
    ``tokenizers`` WordPiece trainer breaks ties differently from run to run, which would break
    checkpoints and resume). Unknown words fall back to characters.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is below the {len(vocab)} special and character tokens")
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab += words[: vocab_size - len(vocab)]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local folder (or the local HF cache); never downloads.

    ``minilm`` names the tokenizer of the packaged MiniLM (extra ``memefx[minilm]``).
    """
    if name_or_path == "minilm":
        from memefx.pretrained import minilm_path

        name_or_path = minilm_path()
    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer {name_or_path!r} is not a fast tokenizer; segments need sequence_ids")
    return tok


def check_max_length(tokenizer: PreTrainedTokenizerFast, max_length: int, pair: bool) -> None:
    """Fail when ``max_length`` cannot hold the special tokens plus one token of each segment.

    Below that, the tokenizer silently ignores the limit (1) or truncates every text token away (2),
    and the model trains on nothing but [CLS]/[SEP].
    """
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    needed = specials + (2 if pair else 1)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < needed:
        what = "one meme-text token and one image-side token" if pair else "one text token"
        raise ValueError(f"data.max_length={max_length!r} cannot hold the {specials} special tokens plus {what}: "
                         f"set it to at least {needed} (typical: 48 to 128)")


def encode(
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    pairs: list[str] | None = None,
    max_length: int = 48,
) -> dict[str, torch.Tensor]:
    """Tokenize texts (and optional second segments) into ids, masks and a segment tensor.

    With ``pairs``, the second sequence is the image side (an image description), so its tokens get the
    ``IMAGE`` segment; both sides are truncated longest-first to ``max_length``.
    """
    enc = tokenizer(
        texts, pairs, padding=True, truncation="longest_first" if pairs else True, max_length=max_length,
        return_tensors="pt", return_token_type_ids=True,
    )
    segments = torch.full_like(enc["input_ids"], SPECIAL)
    for b in range(len(texts)):
        for pos, seq in enumerate(enc.sequence_ids(b)):
            if seq is not None:
                segments[b, pos] = TEXT if seq == 0 else IMAGE
    segments[enc["attention_mask"] == 0] = PAD
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc["token_type_ids"],
        "segments": segments,
    }


class MemeCollator:
    """Turn a list of dataset items into a batch: ids, tokens, segments, image input, labels, strata.

    The image side is either ``pixel_values`` (pixels mode) or description tokens in the text pair
    (caption mode). Stratum ids are -1 where a meme belongs to no stratum of that kind; labels are -1 for
    unlabeled memes. ``batch["split"]`` names the split of the items (one split per batch).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_length: int = 48, caption_mode: bool = False,
                 tags_as_pair: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.caption_mode = caption_mode
        self.tags_as_pair = tags_as_pair

    def __call__(self, items: list[dict]) -> dict:
        texts = [it["text"] for it in items]
        pairs = None
        if self.caption_mode:
            pairs = [it["description"] for it in items]
        elif self.tags_as_pair:  # OSCAR: object tags describe the picture, so they sit on the image side
            pairs = [it["tags"] or "[UNK]" for it in items]
        batch = encode(self.tokenizer, texts, pairs, self.max_length)
        batch["ids"] = [it["id"] for it in items]
        splits = {it["split"] for it in items if "split" in it}
        if len(splits) > 1:
            raise ValueError(f"one batch mixes memes of splits {sorted(splits)}: use one DataLoader per split")
        if splits:
            batch["split"] = splits.pop()
        batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        for column in STRATUM_COLUMN.values():
            batch[column] = torch.tensor([it[column] for it in items], dtype=torch.long)
        if "pixel_values" in items[0]:
            batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
        if "regions" in items[0]:
            from memefx.data.regions import pad_regions

            batch.update(pad_regions([it["regions"] for it in items]))
        if "tags" in items[0]:
            batch["tags"] = [it["tags"] for it in items]
        return batch
