"""Where derived artefacts (token caches, distilled sub-FMs, runs) live.

Caches go under ``data/cache`` of the checkout (git-ignored) so the labs and the CLI share them;
``FEDPFT_LAB_CACHE`` overrides the location (tests point it at a temporary folder).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LABS_DIR = REPO_ROOT / "labs"   # the lab notebooks (instructor edition) of a checkout


def lab_notebooks(labs: Path = LABS_DIR) -> list[Path]:
    """The numbered lab notebooks ``NN_name.ipynb`` in ``labs``, in order."""
    return sorted(Path(labs).glob("[0-9][0-9]_*.ipynb"))


def cache_dir() -> Path:
    """The cache root, created on first use."""
    env = os.environ.get("FEDPFT_LAB_CACHE")
    if env:
        root = Path(env)
    elif (REPO_ROOT / "data").is_dir():
        root = REPO_ROOT / "data" / "cache"
    else:
        root = Path.home() / ".cache" / "fedpft-lab"
    root.mkdir(parents=True, exist_ok=True)
    return root


def config_key(obj: object) -> str:
    """A short stable hash of a JSON-serialisable configuration, used to name cache entries."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def set_offline_env() -> None:
    """No Hub, no dataset downloads, no Flower telemetry: the lab must run in a closed room."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
