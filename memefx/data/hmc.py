"""Reader for the Hateful Memes Challenge layout, with validation that names file, line and id.

Every check runs in the main process when the data module is set up, so a bad file stops the run with a
message saying what to fix instead of a traceback from inside a DataLoader worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from PIL import Image

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
LABELED_SPLITS = ("train", "dev_seen", "dev_unseen")
UNLABELED = -1
_SHOW = 10  # how many offending ids an error lists


class HMCFormatError(ValueError):
    """Malformed HMC data: the message names the file, line or id and the offending value."""


def normalize_id(value: object, where: str) -> str:
    """Return the 5-digit zero-padded string form of a meme id (HMC files mix ints and strings)."""
    if isinstance(value, bool):
        raise HMCFormatError(f"{where}: id {value!r} is a boolean, expected an integer or digit string")
    if isinstance(value, int):
        if value < 0:
            raise HMCFormatError(f"{where}: id {value} is negative")
        return f"{value:05d}"
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return f"{int(value):05d}"
    if isinstance(value, str) and value.strip().isdigit():
        return value.strip().zfill(5)
    raise HMCFormatError(f"{where}: id {value!r} is not an integer or a string of digits")


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return f"{shown}{', ...' if len(items) > _SHOW else ''}"


def read_split(path: str | Path, split: str | None = None) -> pd.DataFrame:
    """Read one HMC jsonl file into a frame with columns id, img, text, label, split, line.

    Labels must be 0 or 1 in the labeled splits (train/dev); test files may omit them (stored as -1).
    """
    path = Path(path)
    split = split or path.stem
    labeled = split in LABELED_SPLITS
    rows = []
    with open(path, "rb") as f:
        for line_no, raw_bytes in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                raise HMCFormatError(
                    f"{where}: byte {raw_bytes[err.start:err.start + 1]!r} at column {err.start + 1} is not UTF-8 "
                    f"({raw_bytes[:60]!r}); re-save the file as UTF-8"
                ) from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise HMCFormatError(f"{where}: malformed JSON ({err.msg}): {raw.strip()[:80]!r}") from None
            if not isinstance(obj, dict):
                raise HMCFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("id", "img"):
                if key not in obj:
                    raise HMCFormatError(f"{where}: missing key {key!r} (keys: {sorted(obj)})")
            meme_id = normalize_id(obj["id"], where)
            text = obj.get("text")
            if not isinstance(text, str):
                raise HMCFormatError(f"{where}: id {meme_id}: 'text' must be a string (empty is fine), got {text!r}")
            label = obj.get("label", UNLABELED)
            if label is None and not labeled:
                label = UNLABELED
            if isinstance(label, bool) or labeled and label not in (0, 1) or not labeled and label not in (0, 1, UNLABELED):
                raise HMCFormatError(
                    f"{where}: id {meme_id}: label {label!r} is not 0 or 1"
                    + (f" (split {split!r} must be labeled)" if labeled else "")
                )
            img = str(obj["img"]).replace("\\", "/")  # a Windows-written path (img\\01235.png) is the same file
            rows.append((meme_id, img, text, int(label), split, line_no))
    if not rows:
        raise HMCFormatError(f"{path}: split {split!r} holds no memes (the file is empty); restore the file "
                             "or leave this split out of the configuration")
    frame = pd.DataFrame(rows, columns=["id", "img", "text", "label", "split", "line"])
    dup = frame[frame.id.duplicated(keep=False)]
    if len(dup):
        first = dup.groupby("id").line.apply(lambda s: "/".join(map(str, s))).head(_SHOW)
        detail = ", ".join(f"{i} (lines {lines})" for i, lines in first.items())
        raise HMCFormatError(f"{path}: {dup.id.nunique()} duplicate ids: {detail}")
    return frame


def check_images(root: str | Path, frame: pd.DataFrame, verify: bool = True) -> None:
    """Fail with the count and first ids of memes whose image is missing or cannot be decoded.

    With ``verify`` every image is decoded in full: a truncated JPEG passes PIL's header ``verify()``
    and would otherwise crash a DataLoader worker in the middle of an epoch.
    """
    root = Path(root)
    missing, unreadable, tried = [], [], []
    for meme_id, img in zip(frame.id, frame.img):
        path = root / img
        if not path.is_file():
            missing.append(meme_id)
            tried.append(str(path))
            continue
        if verify:
            try:
                with Image.open(path) as im:
                    im.verify()
                with Image.open(path) as im:  # verify() leaves the file unusable: reopen to decode
                    im.load()
            except Exception as err:  # PIL raises many types for a broken file
                unreadable.append(f"{meme_id} ({path}: {type(err).__name__}: {err})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing images under {root} (ids {_listing(missing)}; looked for "
                        f"{tried[0]}{' and others' if len(tried) > 1 else ''})")
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable images (ids {_listing(unreadable)})")
    if problems:
        raise HMCFormatError("; ".join(problems) + ". Restore the files or remove those memes from the jsonl.")


def load_image(path: str | Path, meme_id: str | None = None) -> Image.Image:
    """Open an image as RGB; palette, grayscale and RGBA images are converted (alpha over white).

    A file that cannot be decoded raises ``HMCFormatError`` naming the meme id and the path.
    """
    try:
        return _load_rgb(path)
    except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated/corrupt data
        who = f"meme {meme_id}: " if meme_id is not None else ""
        raise HMCFormatError(f"{who}image {path} cannot be decoded ({type(err).__name__}: {err}); "
                             "restore the file or remove the meme from the jsonl") from None


def _load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, im).convert("RGB")
        return im.convert("RGB")


def read_hmc(root: str | Path, splits: list[str] | tuple[str, ...], images: bool = True) -> dict[str, pd.DataFrame]:
    """Read the requested splits of an HMC folder; with ``images``, check every image too."""
    root = Path(root)
    out = {}
    for split in splits:
        path = root / f"{split}.jsonl"
        if not path.is_file():
            present = sorted(p.name for p in root.glob("*.jsonl"))
            raise HMCFormatError(f"{path}: split file not found (present: {present or 'none'})")
        frame = read_split(path, split)
        if images:
            check_images(root, frame)
        out[split] = frame
    return out


def leakage(train: pd.DataFrame, evaluation: pd.DataFrame) -> dict[str, list[str]]:
    """Memes of an evaluation split that also appear in the training split.

    Returns ``{"ids": [...], "text_img": [...]}``: evaluation ids present in train, and evaluation ids whose
    exact (text, img) pair is a training meme under another id. Either inflates the evaluation figures.
    """
    shared = set(evaluation.id) & set(train.id)
    train_pairs = set(zip(train.text, train.img))
    copied = sorted(i for i, t, im in zip(evaluation.id, evaluation.text, evaluation.img)
                    if im and (t, im) in train_pairs and i not in shared)
    same_id = sorted(shared)
    return {"ids": same_id, "text_img": copied}


def leakage_message(split: str, train_split: str, found: dict[str, list[str]]) -> str | None:
    """One warning line for ``leakage`` results, or None when nothing leaked."""
    parts = []
    if found["ids"]:
        parts.append(f"{len(found['ids'])} ids also in {train_split!r} ({_listing(found['ids'])})")
    if found["text_img"]:
        parts.append(f"{len(found['text_img'])} memes whose exact (text, img) is a {train_split!r} meme "
                     f"({_listing(found['text_img'])})")
    if not parts:
        return None
    return (f"split {split!r}: " + "; ".join(parts)
            + ": its figures are measured partly on training data; remove those memes from one of the files")
