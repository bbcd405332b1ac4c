"""Checkpoint I/O for the official CosyVoice2-0.5B release layout.

A model directory holds ``llm.pt``, ``flow.pt``, ``hift.pt`` (plain state dicts), ``campplus.onnx``,
``speech_tokenizer_v2.onnx``, ``CosyVoice-BlankEN/`` (tokenizer files), optionally ``spk2info.pt``
and, in this project's random checkpoints and the golden sets, ``config.json`` (ModelConfig JSON;
absent in the official release, whose values are ModelConfig's defaults).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig

DOWNLOAD_HINT = (
    "download the official weights, e.g. `pip install modelscope && python -c \"from modelscope import "
    "snapshot_download; snapshot_download('iic/CosyVoice2-0.5B', local_dir='pretrained_models/CosyVoice2-0.5B')\"` "
    "or `huggingface-cli download FunAudioLLM/CosyVoice2-0.5B --local-dir pretrained_models/CosyVoice2-0.5B`"
)


class CheckpointError(Exception):
    """A model directory or weight file does not match what the code expects."""


@dataclass(frozen=True)
class ModelDir:
    root: Path

    @property
    def llm(self) -> Path: return self.root / "llm.pt"
    @property
    def flow(self) -> Path: return self.root / "flow.pt"
    @property
    def hift(self) -> Path: return self.root / "hift.pt"
    @property
    def campplus(self) -> Path: return self.root / "campplus.onnx"
    @property
    def speech_tokenizer(self) -> Path: return self.root / "speech_tokenizer_v2.onnx"
    @property
    def spk2info(self) -> Path: return self.root / "spk2info.pt"
    @property
    def tokenizer_dir(self) -> Path: return self.root / "CosyVoice-BlankEN"
    @property
    def config_json(self) -> Path: return self.root / "config.json"

    def config(self) -> ModelConfig:
        return ModelConfig.load(self.config_json) if self.config_json.exists() else ModelConfig()

    def require(self, *names: str) -> None:
        """Raise CheckpointError naming every missing file (names are property names, e.g. 'llm')."""
        if not self.root.is_dir():
            raise CheckpointError(f"model directory {self.root} does not exist; {DOWNLOAD_HINT}")
        missing = [str(getattr(self, n)) for n in names if not getattr(self, n).exists()]
        if missing:
            raise CheckpointError(f"model directory {self.root} lacks {', '.join(missing)}; {DOWNLOAD_HINT}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain ``torch.save`` state dict on CPU (weights_only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} is not a state dict (got {type(sd).__name__})")
    return sd


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state_dict`` into ``module``; every key must match by name and shape.

    Raises CheckpointError naming the file and every missing, unexpected or misshapen tensor.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshapen = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing keys {_abbrev(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_abbrev(unexpected)}")
        if misshapen:
            parts.append(f"misshapen tensors {_abbrev(misshapen)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def _abbrev(items: list[str], n: int = 12) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', ... ({len(items) - n} more)' if len(items) > n else ''}]"
