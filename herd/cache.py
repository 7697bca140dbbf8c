"""Where herd keeps what it derives once per machine and can derive again (compiled kernels, machine
translations): $HERD_CACHE, or ~/.cache/herd."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    return Path(os.environ.get("HERD_CACHE", Path.home() / ".cache" / "herd")) / name
