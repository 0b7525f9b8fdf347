"""Checkpoints: atomic writes, and loads that never execute pickled code."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT = "ckpt.pt"


def save(path: Path, state: dict) -> None:
    """torch.save to a temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, map_location="cpu") -> dict:
    """Load with weights_only=True: tensors and plain containers only, no code."""
    return torch.load(path, map_location=map_location, weights_only=True)
