"""BLIP-2 descriptions with a tiny random BLIP-2 saved to disk: schema, batching, content-hash cache."""

from __future__ import annotations

import pandas as pd
import pytest
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    OPTConfig,
)

from memefx.cli import main
from memefx.data.collate import train_wordpiece
from memefx.data.tables import CAPTION_COLUMNS, read_captions
from memefx.icl.captions import VARIANTS, describe, load_blip2


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip2")
    tok = train_wordpiece(["a picture of a red star with the words", "question explain describe answer"] * 3, 200)
    tok.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                          num_query_tokens=4)
    image_token = proc.tokenizer.convert_tokens_to_ids(str(proc.image_token))
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 encoder_hidden_size=32, vocab_size=len(tok))
    text = OPTConfig(vocab_size=len(proc.tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                     num_attention_heads=2, word_embed_proj_dim=32, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=4, image_token_index=image_token)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def test_describe_writes_caption_table_and_caches_by_image_content(tiny_blip2, tiny_root, tmp_path):
    memes = pd.read_json(tiny_root / "dev_seen.jsonl", lines=True, dtype={"id": str}).head(10)
    table = describe(memes, tiny_root, tiny_blip2, tmp_path / "cache", batch_size=4, max_new_tokens=4)
    assert list(table.columns) == list(CAPTION_COLUMNS) and sorted(table.image_id) == sorted(memes.id)
    lines = (tmp_path / "cache" / "rank0.jsonl").read_text().splitlines()
    requests = {((tiny_root / img).read_bytes(), template.format(text=text.replace("'", "")))
                for img, text in zip(memes.img, memes.text) for template in VARIANTS.values()}
    assert len(lines) == len(requests) < 4 * len(memes)  # one generation per (picture content, prompt)
    model, processor = load_blip2(tiny_blip2)
    batched = table.set_index("image_id")
    single = describe(memes.head(2), tiny_root, tiny_blip2, tmp_path / "fresh", batch_size=1, max_new_tokens=4,
                      model=model, processor=processor).set_index("image_id")
    pd.testing.assert_frame_equal(single, batched.loc[single.index])  # batching does not change the text

    class Refuse:  # a rerun must not touch the model
        def __getattr__(self, name):
            raise AssertionError("the cache should have answered")

    again = describe(memes, tiny_root, tiny_blip2, tmp_path / "cache", model=Refuse(), processor=Refuse(),
                     max_new_tokens=4)
    pd.testing.assert_frame_equal(again, table)


def test_describe_cli_output_reads_as_caption_table(tiny_blip2, tiny_root, tmp_path, capsys):
    out = tmp_path / "hm_captions.parquet"
    assert main(["icl", "describe", "--root", str(tiny_root), "--splits", "test_seen", "--model", tiny_blip2,
                 "--cache", str(tmp_path / "c"), "--out", str(out), "--max-new-tokens", "3"]) == 0
    captions = read_captions(out)
    assert len(captions) == len(pd.read_json(tiny_root / "test_seen.jsonl", lines=True))
    assert captions[list(VARIANTS)].map(lambda v: isinstance(v, str)).all().all()
