"""What every golden part reads from a set directory (shared/golden/README.md §1)."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from engine.config import ModelConfig


@functools.lru_cache(maxsize=8)
def cases(set_dir: str | Path, name: str):
    """``<set>/cases/<name>`` (a plain torch.save file), loaded once per set."""
    return torch.load(Path(set_dir) / "cases" / name, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=8)
def config(set_dir: str | Path) -> ModelConfig:
    return ModelConfig.load(Path(set_dir) / "model" / "config.json")


def weights(set_dir: str | Path, part: str) -> Path:
    """Path of ``<set>/model/<part>.pt``."""
    return Path(set_dir) / "model" / f"{part}.pt"
