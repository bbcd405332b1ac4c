"""Names of the official ``llm.pt`` tensors in the vLLM model class (``model.CosyVoice2ForVLLM``).

The vLLM class keeps the speech table as ``model.embed_tokens`` (so vLLM's vocabulary is the 6564
speech classes), the Qwen text table as ``text_embedding`` and the decoder head as ``llm_decoder``.
The Qwen ``lm_head`` (151,936 text classes, tied to the text table) is never used for TTS and is
skipped. q/k/v and gate/up are fused later by vLLM's own ``Qwen2Model.load_weights``.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

_BACKBONE = "llm.model.model."
SKIPPED = ("llm.model.lm_head.weight",)
_RENAMES = {
    "speech_embedding.weight": "model.embed_tokens.weight",
    "llm.model.model.embed_tokens.weight": "text_embedding.weight",
    "llm_embedding.weight": "llm_embedding.weight",
    "llm_decoder.weight": "llm_decoder.weight",
    "llm_decoder.bias": "llm_decoder.bias",
}


def vllm_name(official: str) -> str | None:
    """The vLLM parameter name for an ``llm.pt`` key, or None for a key that is deliberately skipped.

    Raises KeyError for a key that is not part of the CosyVoice2 LLM layout (wrong file)."""
    if official in SKIPPED:
        return None
    if official in _RENAMES:
        return _RENAMES[official]
    if official.startswith(_BACKBONE) and (official.startswith(_BACKBONE + "layers.")
                                           or official == _BACKBONE + "norm.weight"):
        return "model." + official[len(_BACKBONE):]
    raise KeyError(f"{official!r} is not a CosyVoice2 llm.pt tensor")


def renamed(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(official name, tensor)`` pairs -> ``(vLLM name, tensor)``, skipping the unused Qwen lm_head."""
    for name, tensor in weights:
        new = vllm_name(name)
        if new is not None:
            yield new, tensor
