"""Shared fixtures: tiny synthetic datasets written once per session, real data where present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memefx.data.synthetic import SyntheticConfig, write_synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_BACKBONE = {
    "vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
    "image_encoder": "test_vit", "image_size": 32,
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the synthetic default out of the user's cache and wandb offline."""
    os.environ["MEMEFX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A 400-meme synthetic HMC folder with 32-pixel images."""
    return write_synthetic(tmp_path_factory.mktemp("tiny"), SyntheticConfig(n_memes=400, seed=3, image_size=32))


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or a skip that says why (the folder is absent on users' machines)."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data {path} not present")
    return path
