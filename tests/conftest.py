"""Shared fixtures: tiny synthetic datasets written once per session, real data where present."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from memefx.data.synthetic import SyntheticConfig, write_synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONF = Path(__file__).resolve().parent / "conf"
TINY_BACKBONE = yaml.safe_load((CONF / "tiny.yaml").read_text())["model"]["backbone_args"]


def free_port() -> int:
    """A TCP port no process listens on right now (the OS picks it: bind port 0), for DDP rendezvous,
    so tests never collide with each other or with a user's jobs on a fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(tmp_path: Path, root: Path, midas: bool = False, callbacks: Sequence[str] = ()) -> Path:
    """``tests/conf/tiny.yaml`` with ``data.root`` set, written to ``tmp_path/tiny.yaml``.

    ``midas`` adds the callbacks of ``conf/midas.yaml``; ``callbacks`` names further fragments of
    ``tests/conf`` (lists of callbacks) appended in order.
    """
    cfg = yaml.safe_load((CONF / "tiny.yaml").read_text())
    cfg["data"]["root"] = str(root)
    fragments = (["midas"] if midas else []) + list(callbacks)
    if fragments:
        cfg["trainer"]["callbacks"] = [cb for name in fragments for cb in yaml.safe_load((CONF / f"{name}.yaml").read_text())]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the synthetic default out of the user's cache and wandb offline."""
    os.environ["MEMEFX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # one thread count for every fit of the suite, in-process or spawned: the busy-machine default
    # (memefx/threads.py) must not make two runs a test compares bit for bit use different counts
    import torch

    os.environ.setdefault("MEMEFX_THREADS", str(torch.get_num_threads()))


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
