"""Small tensor helpers shared by the engine's modules."""
from __future__ import annotations

import torch


def upload(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list (nested lists, or a CPU tensor) as a ``dtype`` tensor on ``device``, without
    blocking the host.

    On CUDA the values go through pinned memory with a non-blocking copy: a copy from pageable
    memory makes the host wait until all GPU work queued before it has run, which would serialise
    the caller with the GPU (e.g. vLLM's sampling step with the forward pass it overlaps)."""
    t = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
