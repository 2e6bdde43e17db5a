"""Synthetic memes with a known, intersectional data-generating process (SPEC section 1).

A meme's text carries a binary *text attribute* (its subject is one of the marked groups) and its image a
binary *image attribute* (the object's colour is a marked colour). The clean label is their AND, so the
label is intersectional: neither modality alone decides it. Observed labels are flipped with probability
``label_noise`` (train split) or ``eval_label_noise`` (the other splits). Every meme whose clean label is
hateful anchors two confounder groups, as HMC was built: the same picture with benign texts
(``img_org_id``) and the same text on benign pictures (``txt_org_id``).

Closed-form answers this process makes testable: the Bayes-optimal predictor is ``1 - eps`` on
hateful configurations and ``eps`` elsewhere, so with clean evaluation labels its miATE is ``1 - 2 eps``
in every stratum.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

MARKED_SUBJECTS = ("zorblings", "quonks", "vexnians", "murples")
NEUTRAL_SUBJECTS = ("gardeners", "pilots", "bakers", "cyclists", "painters", "sailors", "dentists", "farmers")
VERBS = ("love", "hate", "eat", "build", "paint", "watch", "chase", "ignore")
OBJECTS = ("pizza", "mondays", "the rain", "trains", "cats", "music", "the news", "homework")
TEMPLATES = (
    "when {subj} {verb} {obj}",
    "{subj} be like: we {verb} {obj}",
    "nobody: {subj}: we {verb} {obj}",
    "{subj} {verb} {obj} again",
    "me watching {subj} {verb} {obj}",
)
SHORTCUT_WORD = "honestly"

MARKED_COLOURS = ("red", "purple")
NEUTRAL_COLOURS = ("green", "blue", "orange", "yellow", "grey", "brown")
RGB = {
    "red": (220, 30, 30),
    "purple": (130, 40, 170),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 40),
    "grey": (128, 128, 128),
    "brown": (120, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
TEXTURES = ("solid", "striped", "dotted")
BACKGROUNDS = {"white": (245, 245, 245), "cream": (245, 235, 200), "sky": (200, 225, 245), "mint": (210, 240, 220)}

SPLITS = ("train", "dev_seen", "test_seen")
NO_CONFOUNDER = "No Confounder"


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the generator; every field is recorded in ``synthetic.json`` beside the data.

    Attributes:
        n_memes: total number of memes (anchors plus confounders), at most 90,000 (5-digit ids).
        seed: the only source of randomness.
        label_noise: probability of flipping an observed label in the train split.
        eval_label_noise: the same for the evaluation splits (0 keeps evaluation labels clean).
        p_text_attr: probability that an anchor's text carries the marked subject.
        p_image_attr: probability that an anchor's image has a marked colour.
        max_confounders: each hateful anchor gets 1..max confounders of each kind (uniform).
        text_shortcut: probability that a hateful *train* meme gets the word "honestly" appended
            (a unimodal shortcut absent from evaluation splits).
        image_shortcut: probability that a hateful *train* meme's image gets a black frame.
        image_size: side of the square PNG images in pixels.
        split_fractions: fractions of anchor families sent to train / dev_seen / test_seen.
    """

    n_memes: int = 3000
    seed: int = 0
    label_noise: float = 0.05
    eval_label_noise: float = 0.0
    p_text_attr: float = 0.6
    p_image_attr: float = 0.6
    max_confounders: int = 2
    text_shortcut: float = 0.0
    image_shortcut: float = 0.0
    image_size: int = 64
    split_fractions: tuple[float, float, float] = field(default=(0.8, 0.1, 0.1))

    def __post_init__(self) -> None:
        if not 1 <= self.n_memes <= 90_000:
            raise ValueError(f"n_memes={self.n_memes}: must be in 1..90000 (ids are 5-digit strings)")
        for name in ("label_noise", "eval_label_noise"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise ValueError(f"{name}={value}: must be in [0, 0.5) or labels carry no signal")
        for name in ("p_text_attr", "p_image_attr", "text_shortcut", "image_shortcut"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a probability")
        if self.max_confounders < 1:
            raise ValueError(f"max_confounders={self.max_confounders}: must be >= 1")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions={self.split_fractions}: three fractions summing to 1")

    def fingerprint(self) -> str:
        """Short hash of the settings, used to cache the default dataset per configuration."""
        payload = json.dumps(asdict(self), sort_keys=True, default=list).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


@dataclass
class _Meme:
    id: str
    split: str
    text: str
    image_key: tuple
    text_attr: int
    image_attr: int
    clean_label: int
    label: int
    img_org_id: str
    txt_org_id: str
    shortcut_text: bool = False
    shortcut_image: bool = False


def _text(rng: np.random.Generator, marked: bool) -> str:
    subjects = MARKED_SUBJECTS if marked else NEUTRAL_SUBJECTS
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(
        subj=subjects[rng.integers(len(subjects))],
        verb=VERBS[rng.integers(len(VERBS))],
        obj=OBJECTS[rng.integers(len(OBJECTS))],
    )


def _image_key(rng: np.random.Generator, marked: bool) -> tuple:
    colours = MARKED_COLOURS if marked else NEUTRAL_COLOURS
    return (
        colours[rng.integers(len(colours))],
        SHAPES[rng.integers(len(SHAPES))],
        TEXTURES[rng.integers(len(TEXTURES))],
        list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        float(rng.uniform(0.45, 0.8)),  # object size as a fraction of the side
        float(rng.uniform(-0.12, 0.12)),  # horizontal offset
        float(rng.uniform(-0.12, 0.12)),  # vertical offset
    )


def generate_memes(cfg: SyntheticConfig) -> list[_Meme]:
    """Draw the memes of ``cfg`` (no files written): the known data-generating process itself."""
    rng = np.random.default_rng(cfg.seed)
    ids = rng.choice(np.arange(1, 99_999), size=cfg.n_memes, replace=False)
    id_iter = (f"{int(i):05d}" for i in ids)
    memes: list[_Meme] = []
    while len(memes) < cfg.n_memes:
        split = SPLITS[rng.choice(3, p=np.asarray(cfg.split_fractions))]
        text_attr = int(rng.random() < cfg.p_text_attr)
        image_attr = int(rng.random() < cfg.p_image_attr)
        anchor = _Meme(
            id=next(id_iter), split=split, text=_text(rng, bool(text_attr)),
            image_key=_image_key(rng, bool(image_attr)), text_attr=text_attr, image_attr=image_attr,
            clean_label=text_attr & image_attr, label=0, img_org_id=NO_CONFOUNDER, txt_org_id=NO_CONFOUNDER,
        )
        family = [anchor]
        if anchor.clean_label == 1:
            anchor.img_org_id = anchor.id
            anchor.txt_org_id = anchor.id
            for _ in range(rng.integers(1, cfg.max_confounders + 1)):  # same image, benign text
                family.append(_Meme(
                    id="", split=split, text=_text(rng, False), image_key=anchor.image_key, text_attr=0,
                    image_attr=1, clean_label=0, label=0, img_org_id=anchor.id, txt_org_id=NO_CONFOUNDER,
                ))
            for _ in range(rng.integers(1, cfg.max_confounders + 1)):  # same text, benign image
                family.append(_Meme(
                    id="", split=split, text=anchor.text, image_key=_image_key(rng, False), text_attr=1,
                    image_attr=0, clean_label=0, label=0, img_org_id=NO_CONFOUNDER, txt_org_id=anchor.id,
                ))
        for meme in family:
            if len(memes) >= cfg.n_memes:
                break
            if not meme.id:
                meme.id = next(id_iter)
            noise = cfg.label_noise if split == "train" else cfg.eval_label_noise
            meme.label = meme.clean_label ^ int(rng.random() < noise)
            if split == "train" and meme.label == 1:
                meme.shortcut_text = bool(rng.random() < cfg.text_shortcut)
                meme.shortcut_image = bool(rng.random() < cfg.image_shortcut)
            memes.append(meme)
    return memes


def render_image(key: tuple, size: int, frame: bool = False) -> Image.Image:
    """Draw the object described by an image key (colour, shape, texture, background, scale, dx, dy)."""
    colour, shape, texture, background, scale, dx, dy = key
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r = scale * size / 2
    cx, cy = size / 2 + dx * size, size / 2 + dy * size
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:  # star
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=255)
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "striped":
        pattern = (yy // 3) % 2 == 0
    elif texture == "dotted":
        pattern = (yy % 5 < 2) & (xx % 5 < 2)
    else:
        pattern = np.ones((size, size), dtype=bool)
    paint = (np.asarray(mask) > 0) & pattern
    pixels = np.asarray(img).copy()
    pixels[paint] = RGB[colour]
    if frame:
        width = max(2, size // 16)
        pixels[:width], pixels[-width:], pixels[:, :width], pixels[:, -width:] = 0, 0, 0, 0
    return Image.fromarray(pixels)


def describe(key: tuple, text: str) -> dict[str, str]:
    """The four description variants of the caption table, written as BLIP-2 would phrase them."""
    colour, shape, texture, background, scale, dx, dy = key
    size = "large" if scale > 0.65 else "small"
    where = ("left" if dx < -0.04 else "right" if dx > 0.04 else "middle")
    plain = f"a {texture} {colour} {shape} on a {background} background"
    detailed = f"a picture of a {size} {texture} {colour} {shape} in the {where} of a {background} background"
    return {
        "text": plain,
        "text_detailed": detailed,
        "text_captioned": f"{plain} with the words '{text}'",
        "text_detailed_captioned": f"{detailed} with the words '{text}'",
    }


def object_tags(key: tuple) -> list[str]:
    """Object-tag words of an image (OSCAR-style inputs): colour, texture and shape names."""
    return [key[0], key[2], key[1]]


def truth_table(memes: list[_Meme]) -> pd.DataFrame:
    """Per meme: id, split, observed and clean label, attributes, group anchors, tags, image key hash."""
    return pd.DataFrame({
        "id": [m.id for m in memes], "split": [m.split for m in memes], "label": [m.label for m in memes],
        "img_org_id": [m.img_org_id for m in memes], "txt_org_id": [m.txt_org_id for m in memes],
        "text": [f"{m.text} {SHORTCUT_WORD}" if m.shortcut_text else m.text for m in memes],
        "text_attr": [m.text_attr for m in memes], "image_attr": [m.image_attr for m in memes],
        "clean_label": [m.clean_label for m in memes],
        "tags": [" ".join(object_tags(m.image_key)) for m in memes],
        "image_crc": [zlib.crc32(repr((m.image_key, m.shortcut_image)).encode()) for m in memes],
    })


WRITTEN = ("img", *(f"{s}.jsonl" for s in SPLITS), "confounders.parquet", "hm_captions.parquet", "truth.parquet",
           "synthetic.json")


def write_synthetic(out: str | Path, cfg: SyntheticConfig | None = None, overwrite: bool = False) -> Path:
    """Write a complete HMC-layout dataset (jsonl, PNG images, both side tables) for ``cfg``.

    The folder also receives ``synthetic.json`` (the settings) and ``truth.parquet`` (per meme the text
    and image attributes and the clean label), so tests can derive known answers. A folder that already
    holds files is refused (a user's HMC download would be mixed with synthetic memes); ``overwrite``
    first deletes what an earlier ``write_synthetic`` wrote there (other files stay).
    """
    cfg = cfg or SyntheticConfig()
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            held = sorted(p.name for p in out.iterdir())
            raise FileExistsError(f"{out} is not empty ({', '.join(held[:6])}{', ...' if len(held) > 6 else ''}): "
                                  "choose an empty or new folder, or pass --overwrite to replace the synthetic files")
        for name in WRITTEN:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    memes = generate_memes(cfg)
    counts = {split: sum(m.split == split for m in memes) for split in SPLITS}
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"n_memes={cfg.n_memes} leaves split(s) {empty} without memes (drawn: {counts}); "
                         "use more memes (a few hundred at least) or other split_fractions")
    (out / "img").mkdir(parents=True, exist_ok=True)
    png_cache: dict[tuple, bytes] = {}
    for meme in memes:
        key = (meme.image_key, meme.shortcut_image)
        if key not in png_cache:
            buffer = io.BytesIO()
            render_image(meme.image_key, cfg.image_size, frame=meme.shortcut_image).save(buffer, "PNG")
            png_cache[key] = buffer.getvalue()
        (out / "img" / f"{meme.id}.png").write_bytes(png_cache[key])
    for split in SPLITS:
        with open(out / f"{split}.jsonl", "w") as f:
            for meme in memes:
                if meme.split == split:
                    text = f"{meme.text} {SHORTCUT_WORD}" if meme.shortcut_text else meme.text
                    row = {"id": meme.id, "img": f"img/{meme.id}.png", "text": text, "label": meme.label}
                    f.write(json.dumps(row) + "\n")
    truth = truth_table(memes)
    truth[["id", "split", "label", "img_org_id", "txt_org_id"]].to_parquet(out / "confounders.parquet", index=False)
    captions = [{"image_id": m.id, **describe(m.image_key, m.text)} for m in memes]
    pd.DataFrame(captions).to_parquet(out / "hm_captions.parquet", index=False)
    truth.drop(columns=["img_org_id", "txt_org_id"]).to_parquet(out / "truth.parquet", index=False)
    (out / "synthetic.json").write_text(json.dumps(asdict(cfg), indent=2, default=list))
    return out
