"""Neural-source-filter excitation: ``SineGen2`` + ``SourceModuleHnNSF`` (cosyvoice2.md §4.3, README §6).

The random parts are drawn up front by :func:`draw_source_noise` in the reference order
(``rand(B, H)`` initial phases, additive noise, ``randn(B, L, 1)`` for the reference's discarded noise
branch), so the deterministic part can be batched freely. The reference draws the additive noise with
``randn_like`` of a transposed (non-contiguous) [B, L, H] tensor; torch's CPU generator produces
different numbers for a non-contiguous ``normal_`` than for a contiguous one, so we do the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SourceNoise:
    """Random inputs of one source computation for B rows and L samples per row (padded)."""
    rand_ini: torch.Tensor  # [B, H] initial phases in [0, 1), column 0 (the fundamental) zero
    noise: torch.Tensor     # [B, L, H] standard normal; zero beyond a row's own length


def draw_source_noise(batch: int, n_samples: int, harmonics: int, device: torch.device,
                      generators: Sequence[torch.Generator | None] | None = None,
                      row_samples: Sequence[int] | None = None) -> SourceNoise:
    """Draw the three random tensors of one HiFT call, float32, returned on ``device``.

    ``generators=None``: batched draws from the global RNG of ``device``, exactly the reference order
    (so ``torch.manual_seed(s)`` then a B=1 call reproduces the reference). Otherwise one entry per row:
    row i draws ``rand(1, H)``, the noise [1, L_i, H], ``randn(1, L_i, 1)`` from its generator on the
    generator's device (None = the default generator of ``device``), ``L_i = row_samples[i]``.
    """
    if generators is None:
        rand_ini = torch.rand(batch, harmonics, device=device)
        noise = _transposed_normal(batch, n_samples, harmonics, device, None)
        torch.randn(batch, n_samples, 1, device=device)  # the reference's discarded noise branch
    else:
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for {batch} rows")
        lens = list(row_samples) if row_samples is not None else [n_samples] * batch
        inis, noise = [], torch.zeros(batch, n_samples, harmonics, device=device)
        for i, g in enumerate(generators):
            dev = g.device if g is not None else device
            inis.append(torch.rand(1, harmonics, generator=g, device=dev).to(device))
            noise[i, :lens[i]] = _transposed_normal(1, lens[i], harmonics, dev, g)[0].to(device)
            torch.randn(1, lens[i], 1, generator=g, device=dev)
        rand_ini = torch.cat(inis)
    rand_ini[:, 0] = 0
    return SourceNoise(rand_ini, noise)


def _transposed_normal(batch: int, n_samples: int, harmonics: int, device: torch.device,
                       generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal [B, L, H] laid out as [B, H, L] in memory, filled like ``randn_like`` fills it."""
    return torch.empty(batch, harmonics, n_samples, device=device).transpose(1, 2).normal_(generator=generator)


def hold_last_frame(x: torch.Tensor, frame_lens: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """x [B, T, C]: frames at or after row i's length repeat its last real frame (edge clamping)."""
    if frame_lens is None:
        return x
    B, T, C = x.shape
    last = torch.as_tensor(frame_lens, device=x.device)[:, None] - 1
    idx = torch.minimum(torch.arange(T, device=x.device)[None, :], last)
    return x.gather(1, idx[:, :, None].expand(B, T, C))


class SourceModuleHnNSF(nn.Module):
    """f0 [B, T] (Hz, frame rate) -> source [B, 1, T * upsample_scale] in [-1, 1]."""

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int, sine_amp: float,
                 noise_std: float, voiced_threshold: float):
        super().__init__()
        self.sampling_rate, self.upsample_scale = sampling_rate, upsample_scale
        self.dim = harmonic_num + 1
        self.sine_amp, self.noise_std, self.voiced_threshold = sine_amp, noise_std, voiced_threshold
        self.l_linear = nn.Linear(self.dim, 1)

    def forward(self, f0: torch.Tensor, draws: SourceNoise,
                frame_lens: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """f0 [B, T] -> source [B, 1, T * upsample_scale].

        ``frame_lens`` (None = all T) gives each row's real frames; samples of a row depend only on its
        own real frames. The op order mirrors the reference so that float32 results are bit-exact."""
        up = self.upsample_scale
        f0_up = F.interpolate(f0[:, None], scale_factor=float(up), mode="nearest").transpose(1, 2)
        harmonics = torch.arange(1, self.dim + 1, device=f0.device, dtype=f0.dtype)
        rad = (f0_up * harmonics / self.sampling_rate) % 1                       # [B, L, H]
        rad[:, 0, :] = rad[:, 0, :] + draws.rand_ini.to(rad.dtype)
        # Phase is integrated at frame rate (linear down-sampling) and interpolated back.
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / up, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * math.pi
        phase = hold_last_frame(phase, frame_lens)
        phase = F.interpolate(phase.transpose(1, 2) * up, scale_factor=float(up), mode="linear")
        sines = torch.sin(phase.transpose(1, 2)) * self.sine_amp
        uv = (f0_up > self.voiced_threshold).to(f0.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        sines = sines * uv + noise_amp * draws.noise.to(sines.dtype)
        return torch.tanh(self.l_linear(sines)).transpose(1, 2)
