"""Where every number comes from: config, code and library versions, device, seeds, data fingerprint.

``provenance.json`` sits in each run directory (and in the W&B run config), so a result names its split
and data version, and ``memefx report --compare`` can tell two runs apart.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import memefx

LIBRARIES = ("torch", "lightning", "transformers", "timm", "torchmetrics", "tokenizers", "pandas", "numpy")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(datamodule) -> dict:
    """Hash of each split file and side table the data module reads, and row counts per loaded split."""
    files = {}
    root = datamodule.root
    if root is not None and root.is_dir():
        for path in sorted(root.glob("*.jsonl")) + sorted(root.glob("*.parquet")):
            files[path.name] = file_digest(path)
    for name in ("confounders", "captions", "tags_file"):
        given = datamodule.hparams.get(name)
        if given and Path(given).is_file():
            files[Path(given).name] = file_digest(Path(given))
    rows = {split: int(len(frame)) for split, frame in datamodule.frames.items()}
    # where the side tables were found, so readers of the run (memefx report) need no data module
    tables = {}
    locate = getattr(datamodule, "side_table", None)  # a MemeDataModule's; other data modules record none
    for key, default in (("confounders", "confounders.parquet"), ("captions", "hm_captions.parquet")):
        found = locate(datamodule.hparams.get(key), default) if locate else None
        tables[key] = str(Path(found).resolve()) if found else None
    digest = hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"root": str(root) if root else None, "files": files, "rows": rows, "digest": digest, "tables": tables,
            "val_from_train": getattr(datamodule, "carved", None)}


def git_commit() -> str | None:
    """Commit of the memefx checkout when it is a git work tree (with '+dirty' for local changes); inside a
    container image (no git) the commit it was built from, ``MEMEFX_GIT_COMMIT``."""
    repo = Path(memefx.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        built = os.environ.get("MEMEFX_GIT_COMMIT", "").strip()
        return f"{built} (image build argument)" if built and built != "unknown" else None
    return commit + ("+dirty" if dirty else "")


def versions() -> dict:
    out = {"python": sys.version.split()[0], "memefx": memefx.__version__}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def device() -> dict:
    info = {"platform": platform.platform(), "cpu_count": torch.get_num_threads(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def collect(config: dict, trainer, datamodule, argv: list[str] | None = None) -> dict:
    """The provenance record of one run (``config``: the fully resolved config as plain data)."""
    model_cfg = config.get("model") or {}
    data_cfg = config.get("data") or {}
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv if argv is not None else sys.argv),
        "git_commit": git_commit(),
        "versions": versions(),
        "device": device(),
        "trainer": {"accelerator": type(trainer.accelerator).__name__, "strategy": type(trainer.strategy).__name__,
                    "world_size": trainer.world_size,
                    "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__, "precision": str(trainer.precision),
                    "deterministic": torch.are_deterministic_algorithms_enabled()},
        "seeds": {"seed_everything": config.get("seed_everything"), "model": model_cfg.get("seed"),
                  "data_order": data_cfg.get("shuffle_seed"), "miate_bootstrap": model_cfg.get("miate_seed"),
                  "synthetic": (data_cfg.get("synthetic") or {}).get("seed")},
        "data": data_fingerprint(datamodule),
        "config": config,
    }
