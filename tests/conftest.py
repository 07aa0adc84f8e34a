"""Test-session setup: closed room, shared derived caches, modest threading.

This module is imported before any test module, so the environment below is in place before anything imports
transformers, datasets or huggingface_hub (they read these variables at import time).

All tests run by default: the ``slow`` and ``notebooks`` markers (see pyproject.toml) are labels only, and
there is no ``--run-slow`` switch.  Deselect them yourself when iterating, e.g. ``pytest -m "not slow"``.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# No Hub, no dataset downloads, no Flower telemetry, no tokenizer fork warnings: forced, not defaulted.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    FLWR_TELEMETRY_ENABLED="0",
    TOKENIZERS_PARALLELISM="false",
)

# One cache for the whole session (and across sessions), so the real MiniLM token caches, corpus blocks and
# distilled sub-FMs are built once; kept apart from the user's own runs in data/cache.  An explicit setting wins.
os.environ.setdefault("FEDPFT_LAB_CACHE", str(REPO_ROOT / "data" / "cache" / "tests"))

# Small CI machines (2 cores) thrash with oversubscribed BLAS/OpenMP pools; cap them before torch is imported.
TORCH_THREADS = max(1, min(4, os.cpu_count() or 1))
os.environ.setdefault("OMP_NUM_THREADS", str(TORCH_THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(TORCH_THREADS))


def pytest_configure(config):
    Path(os.environ["FEDPFT_LAB_CACHE"]).mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:  # the packaging tests do not need torch
        return
    torch.set_num_threads(TORCH_THREADS)


# ----------------------------------------------------------------------------- shared models and data
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM FM with a seeded 2-class head. Never modify it: deep-copy first."""
    from fedpft_lab import models

    return models.load_fm("minilm", num_labels=2, seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    from fedpft_lab import models

    return models.load_preprocessor("minilm")


@pytest.fixture(scope="session")
def tiny_data_config():
    """A data configuration small enough for federated runs of a tiny model in a second or two."""
    from fedpft_lab.workspace import DataConfig

    return DataConfig(fm="tiny-bert", task="tweets", clients=4, max_train=160, max_test=64,
                      public_blocks=64, block_size=32, probe_batches=2, probe_batch_size=8, seed=0)


@pytest.fixture(scope="session")
def tiny_ws(tiny_data_config):
    from fedpft_lab.workspace import prepare

    return prepare(tiny_data_config)
