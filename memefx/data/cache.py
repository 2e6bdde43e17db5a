"""Where memefx keeps what it can rebuild (the synthetic default, region-file indexes): ``$MEMEFX_CACHE``
or ``~/.cache/memefx``. A leaf module, so readers of data files need not import the data module."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$MEMEFX_CACHE``, else ``~/.cache/memefx``."""
    return Path(os.environ.get("MEMEFX_CACHE", Path.home() / ".cache" / "memefx"))
