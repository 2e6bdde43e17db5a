"""Image descriptions with BLIP-2 (SPEC section 5): the four variants of the caption table.

Each (image content, prompt variant, model, settings) is generated once: results are cached by a hash of
the image bytes and of the model's weights (not its path), so identical pictures (confounders share them)
and reruns cost nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import torch

from memefx.data.hmc import load_image
from memefx.icl.engine import ResultCache, UserError, model_fingerprint, resolve_model

# prompt per caption-table column; "{text}" is the meme's overlaid text
VARIANTS = {
    "text": "",
    "text_detailed": "Question: Explain this picture in details. Answer:",
    "text_captioned": "Question: Describe this picture. It shows the words '{text}'. Answer:",
    "text_detailed_captioned": "Question: Explain this picture in details. It shows the words '{text}'. Answer:",
}


def _key(image_digest: str, prompt: str, model_fingerprint: str, max_new_tokens: int) -> str:
    payload = json.dumps([image_digest, prompt, model_fingerprint, max_new_tokens])
    return hashlib.sha256(payload.encode()).hexdigest()


def load_blip2(path: str):
    """(model, processor) from a local folder or the local HF cache; the processor pads on the left."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    folder = str(resolve_model(path))
    try:
        processor = Blip2Processor.from_pretrained(folder, local_files_only=True)
        model = Blip2ForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise UserError(f"model folder {folder} does not load as BLIP-2 with its processor: {err}") from err
    processor.tokenizer.padding_side = "left"
    return model, processor


@torch.no_grad()
def describe(memes: pd.DataFrame, root: str | Path, model_path: str, cache: str | Path, batch_size: int = 8,
             max_new_tokens: int = 40, model=None, processor=None) -> pd.DataFrame:
    """Caption table (image_id + the four variants) for ``memes`` (columns id, img, text) under ``root``."""
    root = Path(root)
    store = ResultCache(cache, valid=lambda row: isinstance(row.get("description"), str))
    done = {k: row["description"] for k, row in store.load().items()}
    fingerprint = model_fingerprint(model_path)
    digests = {i: hashlib.sha256((root / img).read_bytes()).hexdigest() for i, img in zip(memes.id, memes.img)}
    requests = {}  # key -> (image path, prompt)
    cells = []
    for meme_id, img, text in zip(memes.id, memes.img, memes.text):
        for column, template in VARIANTS.items():
            prompt = template.format(text=text.replace("'", ""))
            key = _key(digests[meme_id], prompt, fingerprint, max_new_tokens)
            cells.append((meme_id, column, key))
            if key not in done:
                requests.setdefault(key, (root / img, prompt))
    todo = list(requests)
    if todo and model is None:
        model, processor = load_blip2(model_path)
    for start in range(0, len(todo), batch_size):
        keys = todo[start:start + batch_size]
        images = [load_image(requests[k][0]) for k in keys]
        inputs = processor(images=images, text=[requests[k][1] for k in keys], return_tensors="pt", padding=True)
        out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        rows = [{"key": k, "description": t.strip()} for k, t in zip(keys, texts)]
        store.append(rows)
        done.update({r["key"]: r["description"] for r in rows})
    table = pd.DataFrame(cells, columns=["image_id", "column", "key"])
    table["description"] = table.key.map(done)
    wide = table.pivot(index="image_id", columns="column", values="description").reset_index()
    return wide[["image_id", *VARIANTS]].rename_axis(columns=None)
