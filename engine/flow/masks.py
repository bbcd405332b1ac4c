"""Attention masks of the flow, built per row so one batch can mix lengths and streaming flags.

All builders are pure tensor ops on the device of their inputs: no host syncs and no shapes that depend
on tensor values (only on ``T``), so they can run inside a captured CUDA graph.
"""
from __future__ import annotations

import torch


def length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``lengths`` int [B] -> bool [B, T], True at frames ``t < lengths[b]``."""
    return torch.arange(T, device=lengths.device) < lengths.to(torch.long).unsqueeze(1)


def chunk_mask(T: int, chunk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Block-causal bool [T, T]: query i sees key j iff j < (i // chunk + 1) * chunk (unlimited left)."""
    pos = torch.arange(T, device=device)
    return pos.unsqueeze(0) < ((pos // chunk + 1) * chunk).unsqueeze(1)


def attention_allowed(key_valid: torch.Tensor, chunk: int, streaming: bool | torch.Tensor) -> torch.Tensor:
    """Which keys each query may attend to, bool [B, T, T].

    ``key_valid`` bool [B, T] (padding mask). ``streaming`` is a Python bool for the whole batch or a
    bool tensor [B]; streaming rows additionally get the ``chunk``-frame block-causal mask. Padded query
    rows see the row's valid keys, so no row is fully masked unless its length is 0.
    """
    B, T = key_valid.shape
    allowed = key_valid.unsqueeze(1).expand(B, T, T)
    if isinstance(streaming, bool):
        return allowed & chunk_mask(T, chunk, key_valid.device) if streaming else allowed
    causal = chunk_mask(T, chunk, key_valid.device).unsqueeze(0) | ~streaming.view(B, 1, 1)
    return allowed & causal


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> additive attention bias of ``dtype``: 0 where allowed, -1e10 where masked.

    Upstream uses -1e10 (not -inf) so a fully masked row stays finite; for float16, whose range ends at
    65504, the bias is the dtype's most negative finite value instead."""
    neg = max(-1.0e10, torch.finfo(dtype).min)
    return (1.0 - allowed.to(dtype)) * neg
