"""Row-length-aware STFT / iSTFT for the HiFT head (n_fft 16, hop 4, periodic Hann, center=True).

Both match ``torch.stft`` / ``torch.istft`` with ``center=True`` for a row of its own length, also
when the row sits zero-padded in a longer batch: the reflection padding and the window envelope are
taken per row. The iSTFT avoids ``torch.istft``'s envelope check (a host sync on GPU).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def hann_window(n_fft: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Periodic Hann window [n_fft], computed in float64 then cast (as scipy's ``get_window('hann')``)."""
    n = torch.arange(n_fft, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * torch.pi * n / n_fft)).to(device=device, dtype=dtype)


def reflect_pad_rows(x: torch.Tensor, pad: int, lens: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L] -> [B, L + 2·pad]: row i reflection-padded at its own length ``lens[i]`` (zeros after)."""
    if lens is None:
        return F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
    B, L = x.shape
    n = torch.as_tensor(lens, device=x.device)[:, None]
    p = torch.arange(L + 2 * pad, device=x.device)[None, :]
    q = (p - pad).abs()                                                      # left reflection
    q = torch.where(q >= n, 2 * (n - 1) - q, q)                              # right reflection
    valid = (p < n + 2 * pad) & (q >= 0)
    return torch.where(valid, x.gather(1, q.clamp(0, L - 1)), torch.zeros((), dtype=x.dtype, device=x.device))


def stft(x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor,
         lens: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L] -> complex spectrum [B, n_fft//2+1, L//hop + 1] (center=True, reflect padding).

    With ``lens`` the frames of row i past ``lens[i] // hop + 1`` are not meaningful (callers mask them)."""
    padded = reflect_pad_rows(x, n_fft // 2, lens)
    return torch.stft(padded, n_fft, hop, n_fft, window=window, center=False, return_complex=True)


def istft(spec: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor,
          frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Complex spectrum [B, n_fft//2+1, F] -> signal [B, hop·(F−1)] (center=True, like ``torch.istft``).

    ``frame_mask`` [B, F] (1 = real frame) makes row i equal the iSTFT of its own real frames only;
    samples past a row's frames are then 0."""
    B, _, n_frames = spec.shape
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None]    # [B, n_fft, F]
    weights = (window * window)[None, :, None].expand(1, n_fft, n_frames)
    if frame_mask is not None:
        frames = frames * frame_mask[:, None, :]
        weights = weights * frame_mask[:, None, :]
    total = n_fft + hop * (n_frames - 1)

    def overlap_add(t: torch.Tensor) -> torch.Tensor:
        return F.fold(t, output_size=(1, total), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]

    start, end = n_fft // 2, total - n_fft // 2
    y = overlap_add(frames)[:, start:end]
    envelope = overlap_add(weights)[:, start:end]
    return torch.where(envelope > 1e-11, y / torch.where(envelope > 1e-11, envelope, 1), 0)
