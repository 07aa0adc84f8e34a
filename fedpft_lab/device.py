"""Where a run computes: the CPU (the lab's home), a CUDA GPU or Apple's MPS.

One rule keeps the rest of the package simple: models live on the device, everything that travels between
server and clients (adapter states, activity statistics, weight packages, checkpoints) lives on the CPU, as
it would on the wire. Code that feeds a model moves its inputs with :func:`to_device`; code that takes
tensors out of a model moves them back with ``.cpu()``. On the CPU both are no-ops that return the very same
tensors, so a CPU run computes bit for bit what it computed before devices existed (tests check this).

Float64 reductions (FedAvg, the gradient probe, activity sums) run on the CPU: MPS has no float64, and on
CUDA these tensors are small.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .config import DEVICES
from .errors import ConfigError, check_choice


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if a GPU is visible, else MPS, else the CPU. A named device that is missing is an error."""
    check_choice("device", name, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA GPU; use --device auto or cpu")
    elif name == "mps" and not _mps_available():
        raise ConfigError("device 'mps' requested but this torch has no MPS backend; use --device auto or cpu")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (every model in the lab lives on one device)."""
    return next(model.parameters()).device


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on ``device`` (the same tensor objects when they are there already)."""
    return {k: v.to(device) for k, v in batch.items()}


def side_by_side(device: torch.device) -> bool:
    """Train clients (and evaluate) as several single-threaded jobs at once? Only on the CPU: a GPU runs one
    job's kernels at a time anyway, and each job would need its own copy of the model in GPU memory."""
    return device.type == "cpu"
