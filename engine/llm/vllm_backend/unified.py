"""Embedding lookup over the unified id space (``engine.llm.ids``) with static shapes.

Three clamped table lookups merged by two ``torch.where``: no boolean indexing and no host sync, so
the mapping is safe inside torch.compile and CUDA graphs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from engine.llm import ids as uid

Lookup = Callable[[Tensor], Tensor]


def embed_unified(ids: Tensor, speech: Lookup, special: Lookup, text: Lookup, text_vocab: int) -> Tensor:
    """Unified ids (long, any shape) -> embeddings ``[..., H]``.

    ``speech`` looks up rows 0..6563 (speech_embedding), ``special`` rows 0..1 (llm_embedding:
    sos, task_id), ``text`` rows 0..text_vocab-1 (the Qwen text table). Out-of-range ids are clamped
    into each table, never read out of bounds."""
    e_speech = speech(ids.clamp(0, uid.NUM_SPEECH_CLASSES - 1))
    e_special = special((ids - uid.SOS_ID).clamp(0, 1))
    e_text = text((ids - uid.TEXT_OFFSET).clamp(0, text_vocab - 1))
    out = torch.where((ids < uid.SOS_ID).unsqueeze(-1), e_speech, e_special)
    return torch.where((ids >= uid.TEXT_OFFSET).unsqueeze(-1), e_text, out)
