"""Helpers for the Vilio tests: the oracle's user files as an HMC folder, and region TSVs written in Vilio's layout."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SHARED_DATA

ORACLE = SHARED_DATA / "vilio_oracle"
FAMILIES = {"U": "vilio_uniter", "O": "vilio_oscar", "V": "vilio_visualbert"}
CONFIGS = {"U": "vilio_uniter", "O": "vilio_oscar", "V": "vilio_visualbert"}
# O and V were built with max_seq_len=16 (text slots before the first region); U gathers, so it has none
MAX_SEQ_LEN = {"U": None, "O": 16, "V": 16}


def oracle_dir(family: str) -> Path:
    folder = ORACLE / family
    if not (folder / "outputs.pt").is_file():
        pytest.skip(f"Vilio oracle {folder} not present")
    return folder


def oracle_root(family: str, out: Path) -> Path:
    """An HMC folder holding the oracle's four memes as ``dev_seen.jsonl`` (the second meme on picture 101
    renumbered 102: meme ids are unique, the picture stays), its ``regions.tsv``, ``bert/`` and checkpoint,
    and a confounder table: 101/102 share a picture, 202/303 share a text."""
    src = oracle_dir(family)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (src / "memes.jsonl").read_text().splitlines() if line.strip()]
    rows[1]["id"] = 102
    (out / "dev_seen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("regions.tsv", "state_dict.pt"):
        shutil.copy(src / name, out / name)
    shutil.copytree(src / "bert", out / "bert", dirs_exist_ok=True)
    pd.DataFrame({"id": ["00101", "00102", "00202", "00303"], "split": "dev_seen", "label": [1, 0, 1, 0],
                  "img_org_id": ["00101", "00101", "No Confounder", "No Confounder"],
                  "txt_org_id": ["No Confounder", "No Confounder", "00202", "00202"]}).to_parquet(out / "confounders.parquet")
    return out


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def tsv_line(img_id: str, height: int, width: int, boxes: np.ndarray, feats: np.ndarray, num_boxes: int | None = None) -> str:
    """One picture in Vilio's TSV layout (pixel boxes, float32 features; objects/attrs zero)."""
    n = len(boxes)
    zeros_i, zeros_f = np.zeros(n, np.int64), np.zeros(n, np.float32)
    fields = [img_id, str(height), str(width), _b64(zeros_i), _b64(zeros_f), _b64(zeros_i), _b64(zeros_f),
              str(n if num_boxes is None else num_boxes), _b64(boxes.astype(np.float32)), _b64(feats.astype(np.float32))]
    return "\t".join(fields) + "\n"


def random_boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    x1, y1 = rng.uniform(0, width / 2, n), rng.uniform(0, height / 2, n)
    return np.stack([x1, y1, x1 + rng.uniform(1, width / 2, n), y1 + rng.uniform(1, height / 2, n)], 1)


def synthetic_region_tsv(root: Path, path: Path, n_regions: int = 6, dim: int = 32, seed: int = 0) -> Path:
    """Region features for a synthetic HMC folder: one line per picture, features that carry the picture's
    intersectional attribute (a planted signal a model can learn) plus picture-specific noise."""
    truth = pd.read_parquet(root / "truth.parquet")
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim).astype(np.float32)
    pictures: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # one picture per image hash: shared-image memes share it
    lines = []
    for meme_id, attr, crc in zip(truth.id, truth.image_attr, truth.image_crc):
        if crc not in pictures:
            noise = rng.normal(scale=0.5, size=(n_regions, dim)).astype(np.float32)
            pictures[crc] = (random_boxes(rng, n_regions, 64, 96), noise + (2.0 if attr else -2.0) * direction)
        lines.append(tsv_line(meme_id, 64, 96, *pictures[crc]))
    path.write_text("".join(lines))
    return path
