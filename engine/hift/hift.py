"""``HiFTGenerator``: the CosyVoice2 HiFi-GAN + iSTFT vocoder, mel [B, 80, T] -> 24 kHz speech [B, 480·T].

cosyvoice2.md §4 and golden README §6. State-dict keys equal the official ``hift.pt`` with the legacy
weight-norm spelling (``X.weight_g`` / ``X.weight_v``); :func:`load_hift` also accepts
``X.parametrizations.weight.original0/1``.

Batching: rows may have different real lengths (``mel_lens``). Every convolution is non-causal, so the
padded time steps are zeroed after each convolution (the reference sees zero padding there), the source
STFT reflects each row at its own end and the iSTFT uses each row's own window envelope. Row i of a
batched call therefore equals a separate call on that row (up to float rounding).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import CheckpointError, load_strict
from engine.config import HiFTConfig
from engine.hift.f0 import ConvRNNF0Predictor, masked
from engine.hift.source import SourceModuleHnNSF, SourceNoise, draw_source_noise
from engine.hift.stft import hann_window, istft, stft
from engine.hift.weight_norm import WNConv1d, WNConvTranspose1d, WeightNormConv
from engine.tensors import upload

SNAKE_EPS = 1e-9
MAGNITUDE_MAX = 1e2


class Snake(nn.Module):
    """``x + sin(alpha·x)² / (alpha + 1e-9)`` with one linear-scale alpha per channel; x [B, C, L].

    Without autograd, alpha as [1, C, 1] and its inverse are cached (keyed like the weight-norm
    cache): the eager vocoder is launch-bound, and this leaves 4 kernels per activation instead of 7."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, inverse = self.coefficients()
        return torch.addcmul(x, inverse, torch.sin(x * alpha).square())

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha [1, C, 1] and 1 / (alpha + 1e-9), cached when gradients are off."""
        a = self.alpha
        if torch.is_grad_enabled():
            alpha = a[None, :, None]
            return alpha, 1.0 / (alpha + SNAKE_EPS)
        key = (a._version, a.data_ptr(), a.device, a.dtype)
        if self._folded is None or self._folded[0] != key:
            alpha = a.detach()[None, :, None]
            self._folded = (key, alpha, 1.0 / (alpha + SNAKE_EPS))
        return self._folded[1], self._folded[2]


class ResBlock(nn.Module):
    """Three (Snake, dilated conv, Snake, conv) residual units; [B, C, L] -> [B, C, L]."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, padding=(kernel_size * d - d) // 2,
                                             dilation=d) for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            xt = masked(c1(a1(x)), mask)
            xt = masked(c2(a2(xt)), mask)
            x = xt + x
        return x


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.n_fft, self.hop = cfg.istft_params.n_fft, cfg.istft_params.hop_len
        self.samples_per_frame = cfg.samples_per_frame
        self.m_source = SourceModuleHnNSF(cfg.sampling_rate, self.samples_per_frame, cfg.nb_harmonics,
                                          cfg.nsf_alpha, cfg.nsf_sigma, cfg.nsf_voiced_threshold)
        self.conv_pre = WNConv1d(cfg.in_channels, cfg.base_channels, 7, padding=3)
        rates, base = cfg.upsample_rates, cfg.base_channels
        self.ups = nn.ModuleList(
            WNConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(rates, cfg.upsample_kernel_sizes)))
        # The source STFT (hop 4) is brought down to each stage's rate: cumulative rates 15, 3, 1.
        down_rates = np.cumprod([1] + rates[::-1][:-1])[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(down_rates, cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes)):
            ch, u = base // 2 ** (i + 1), int(u)
            self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1) if u == 1 else
                                     nn.Conv1d(self.n_fft + 2, ch, 2 * u, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = WNConv1d(base // 2 ** len(rates), self.n_fft + 2, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_predictor)
        self._window: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------------------
    def fold_weights(self) -> None:
        """Compute and cache every effective weight and Snake coefficient now (they are otherwise
        cached on first use, which could fall inside a CUDA-graph capture)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, WeightNormConv):
                    m.weight()
                elif isinstance(m, Snake):
                    m.coefficients()

    def window(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The periodic Hann(n_fft) analysis/synthesis window on ``device`` (made once per device)."""
        w = self._window
        if w is None or w.device != device or w.dtype != dtype:
            w = self._window = hann_window(self.n_fft, device, dtype)
        return w

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(self, mel: torch.Tensor, mel_lens: Sequence[int] | torch.Tensor | None = None,
                  cache_source: Sequence[torch.Tensor | None] | None = None,
                  generators: Sequence[torch.Generator | None] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, T] -> (speech [B, 480·T] in [-0.99, 0.99] at 24 kHz, source [B, 1, 480·T]).

        ``mel_lens`` [B]: real frames per row (None = all T); outputs past ``480·mel_lens[i]`` are 0.
        ``cache_source[i]`` (any shape, n samples) overwrites the first n source samples of row i.
        ``generators=None`` draws the source noise from the global RNG in the reference order (B=1 then
        matches the reference after ``torch.manual_seed``); a list gives one generator per row (None =
        the default generator of ``mel.device``), each row drawing as a separate B=1 call would.
        """
        B, _, T = mel.shape
        lens = row_lengths(mel_lens, B, T)
        spf = self.samples_per_frame
        draws = draw_source_noise(B, T * spf, self.m_source.dim, mel.device, generators,
                                  None if lens is None else [n * spf for n in lens])
        lens_t = None if lens is None else lens_tensor(lens, mel.device)
        return self.render(mel, lens_t, draws, *source_cache(cache_source, B, mel.device))

    def render(self, mel: torch.Tensor, lens: torch.Tensor | None, draws: SourceNoise,
               cache: torch.Tensor | None = None, cache_lens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic part of ``inference``, free of host syncs (it can be captured in a CUDA
        graph): mel [B, 80, T], ``lens`` int64 [B] real frames per row (None = all T), the drawn
        source noise, and ``cache`` [B, n] whose first ``cache_lens[i]`` samples overwrite the start of
        row i's source. Returns (speech [B, 480·T], source [B, 1, 480·T]), zero past each row's end."""
        T, spf = mel.shape[2], self.samples_per_frame
        f0 = self.f0_predictor(mel, _length_mask(lens, 1, 0, T, mel))
        source = self.m_source(f0, draws, lens)
        if cache is not None:
            n = cache.shape[1]
            cached = torch.arange(n, device=mel.device)[None, :] < cache_lens[:, None]
            source[:, 0, :n] = torch.where(cached, cache.to(source.dtype), source[:, 0, :n])
        speech = self.decode(mel, source, lens)
        if lens is not None:
            keep = _length_mask(lens, spf, 0, T * spf, mel)[:, 0]
            speech = speech * keep
            source = source * keep[:, None]
        return speech, source

    def decode(self, mel: torch.Tensor, source: torch.Tensor,
               lens: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic generator: mel [B, 80, T] and source [B, 1, 480·T] -> speech [B, 480·T].

        ``lens`` [B] (None = all T) gives each row's real mel frames."""
        B, _, T = mel.shape
        lens = None if lens is None else lens_tensor(lens, mel.device)
        window = self.window(mel.device, mel.dtype)
        n_bins, n_frames = self.n_fft // 2 + 1, T * self.samples_per_frame // self.hop + 1
        frames_per_mel = self.samples_per_frame // self.hop

        spec = stft(source[:, 0], self.n_fft, self.hop, window,
                    None if lens is None else lens * self.samples_per_frame)
        frame_mask = _length_mask(lens, frames_per_mel, 1, n_frames, mel)
        s_stft = masked(torch.cat([spec.real, spec.imag], dim=1), frame_mask)

        mel_mask = _length_mask(lens, 1, 0, T, mel)
        x = masked(self.conv_pre(masked(mel, mel_mask)), mel_mask)
        factor, n_stages = 1, len(self.ups)
        for i in range(n_stages):
            factor *= self.cfg.upsample_rates[i]
            last = i == n_stages - 1
            mask = _length_mask(lens, factor, int(last), T * factor + int(last), mel)
            x = self.ups[i](F.leaky_relu(x, self.cfg.lrelu_slope))
            if last:
                x = F.pad(x, (1, 0), mode="reflect")
            x = masked(x, mask)
            si = masked(self.source_downs[i](s_stft), mask)
            x = x + self.source_resblocks[i](si, mask)
            k = len(self.cfg.resblock_kernel_sizes)
            xs = self.resblocks[i * k](x, mask)
            for j in range(1, k):
                xs += self.resblocks[i * k + j](x, mask)
            x = xs / k
        x = self.conv_post(F.leaky_relu(x))
        magnitude = torch.clip(torch.exp(x[:, :n_bins]), max=MAGNITUDE_MAX)
        phase = torch.sin(x[:, n_bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        speech = istft(spec, self.n_fft, self.hop, window, None if frame_mask is None else frame_mask[:, 0])
        return torch.clamp(speech, -self.cfg.audio_limit, self.cfg.audio_limit)


def row_lengths(mel_lens, batch: int, T: int) -> list[int] | None:
    """Validated per-row frame counts, or None when every row is full length (no masking needed)."""
    if mel_lens is None:
        return None
    lens = [int(n) for n in (mel_lens.tolist() if isinstance(mel_lens, torch.Tensor) else mel_lens)]
    if len(lens) != batch or any(n < 1 or n > T for n in lens):
        raise ValueError(f"mel_lens {lens} do not fit a batch of {batch} rows of {T} frames")
    return None if all(n == T for n in lens) else lens


def source_cache(cache_source: Sequence[torch.Tensor | None] | None, batch: int,
                 device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``inference``'s per-row cached source samples as (cache [B, n] float32, cache_lens int64 [B])
    for ``render``; (None, None) when no row has any."""
    if cache_source is None:
        return None, None
    if len(cache_source) != batch:
        raise ValueError(f"got {len(cache_source)} cache_source entries for {batch} rows")
    rows = [None if c is None else c.reshape(-1) for c in cache_source]
    n = max((r.numel() for r in rows if r is not None), default=0)
    if n == 0:
        return None, None
    cache = torch.zeros(batch, n, device=device)
    for i, r in enumerate(rows):
        if r is not None and r.numel():
            cache[i, :r.numel()] = r.to(device, torch.float32)
    return cache, lens_tensor([0 if r is None else r.numel() for r in rows], device)


def lens_tensor(lens: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Row lengths as an int64 tensor on ``device``, uploaded without blocking the host."""
    if isinstance(lens, torch.Tensor):
        return lens.to(device=device, dtype=torch.long)
    return upload(list(lens), torch.long, device)


def _length_mask(lens: torch.Tensor | None, factor: int, extra: int, length: int,
                 like: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, length] mask (dtype of ``like``) of positions < lens[i]·factor + extra; None if no lens."""
    if lens is None:
        return None
    n = lens[:, None] * factor + extra
    return (torch.arange(length, device=like.device)[None, :] < n).to(like.dtype)[:, None, :]


_LEGACY = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def load_hift(module: HiFTGenerator, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load a ``hift.pt`` state dict with either weight-norm spelling into ``module`` (strict).

    ``X.parametrizations.weight.original0/1`` are renamed to ``X.weight_g/weight_v``; then every key
    must match by name and shape, else CheckpointError names the offending keys."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for new_suffix_from, new_suffix in _LEGACY.items():
            if key.endswith("." + new_suffix_from):
                key = key[: -len(new_suffix_from)] + new_suffix
                break
        if key in converted:
            raise CheckpointError(f"{source}: key {key} appears in both weight-norm spellings")
        converted[key] = value
    load_strict(module, converted, source)
