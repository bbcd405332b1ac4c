"""``CausalConditionalCFM``: 10-step Euler ODE solve with classifier-free guidance and fixed noise.

Spec: shared/spec/cosyvoice2.md §3.5. The starting noise is the same fixed tensor for every call,
indexed from frame 0 of each row's prompt+target sequence, which is what makes streaming recomputation
of a growing prefix reproduce earlier frames.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.config import DecoderConfig
from engine.flow.estimator import CausalConditionalDecoder
from engine.flow.prefix import PrefixRecording, PrefixRows

NOISE_FRAMES = 15000          # 300 s at 50 Hz
NOISE_SEED = 0


def make_noise(mel_dim: int = 80) -> torch.Tensor:
    """The fixed CFM noise [1, mel_dim, 15000] float32 on CPU; equals upstream's
    ``torch.manual_seed(0); torch.randn([1, 80, 15000])`` without touching the global RNG."""
    g = torch.Generator(device="cpu").manual_seed(NOISE_SEED)
    return torch.randn([1, mel_dim, NOISE_FRAMES], generator=g, dtype=torch.float32, device="cpu")


class CausalConditionalCFM(nn.Module):
    """The flow's ``decoder``: owns the estimator (keys ``decoder.estimator.*``) and the ODE solver."""

    def __init__(self, cfg: DecoderConfig, mel_dim: int = 80):
        super().__init__()
        self.cfg = cfg
        self.mel_dim = mel_dim
        self.cfg_rate = cfg.cfm_params.inference_cfg_rate
        if cfg.cfm_params.solver != "euler" or cfg.cfm_params.t_scheduler != "cosine":
            raise ValueError(f"unsupported CFM solver/schedule {cfg.cfm_params}")
        self.estimator = CausalConditionalDecoder(cfg.estimator)
        # Not a buffer (not in flow.pt, never moved by .to()); filled lazily per (device, dtype).
        self._noise: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def noise(self, T: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Frames [0, T) of the fixed noise: [1, mel_dim, T] on ``device`` in ``dtype``."""
        if T > NOISE_FRAMES:
            raise ValueError(f"{T} mel frames exceed the fixed CFM noise length {NOISE_FRAMES} (300 s)")
        key = (torch.device(device), dtype)
        full = self._noise.get(key)
        if full is None:
            full = self._noise[key] = make_noise(self.mel_dim).to(device=key[0], dtype=dtype)
        return full[:, :, :T]

    @property
    def estimator_dtype(self) -> torch.dtype:
        """Dtype the estimator runs in (its parameter dtype)."""
        return next(self.estimator.parameters()).dtype

    def time_grid(self, n_timesteps: int, device) -> torch.Tensor:
        """Cosine-scheduled flow times [n_timesteps + 1] float32 from 0 to 1."""
        t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
        return 1 - torch.cos(t * 0.5 * torch.pi)

    @torch.inference_mode()
    def forward(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                streaming: bool | torch.Tensor = False, n_timesteps: int = 10,
                temperature: float = 1.0, on_step: Callable[[], None] | None = None,
                prefix: PrefixRows | PrefixRecording | None = None) -> torch.Tensor:
        """Solve the flow ODE for a padded batch.

        mu, cond [B, 80, T] float32; mask [B, 1, T] (1 = valid frame); spks [B, 80]; streaming: bool or
        bool [B]. Each Euler step is ONE estimator call over 2B rows (B conditional rows, then the same
        B rows with mu/spks/cond zeroed), guided as (1+r)·v_cond − r·v_uncond with r = 0.7.
        The estimator runs in its own parameter dtype (e.g. bfloat16); the ODE state stays float32.
        ``on_step`` is called after each Euler step but the last (once its work is queued).
        ``prefix``: row b continues the store's cached first ``prefix.frames[b]`` frames of its
        sequence, and frame t of this call is frame ``prefix.frames[b] + t`` of it (noise included);
        needs ``n_timesteps`` = the store's steps and temperature 1. A ``PrefixRecording`` instead
        records the call's keys, values and conv inputs into the store.
        Returns mel [B, 80, T] float32 (padded frames hold unmodified noise).
        """
        B, _, T = mu.shape
        if prefix is None:
            x = self.noise(T, mu.device).expand(B, -1, -1) * temperature
        else:
            if n_timesteps != prefix.store.steps or temperature != 1.0:
                raise ValueError("a cached prefix needs the store's step count and temperature 1")
            noise = self.noise(T + max(prefix.frames), mu.device)[0]
            x = torch.stack([noise[:, c:c + T] for c in prefix.frames])
        e_dtype = self.estimator_dtype
        zeros = torch.zeros_like
        mask_in = torch.cat([mask, mask]).to(e_dtype)
        mu_in = torch.cat([mu, zeros(mu)]).to(e_dtype)
        spks_in = torch.cat([spks, zeros(spks)]).to(e_dtype)
        cond_in = torch.cat([cond, zeros(cond)]).to(e_dtype)
        stream_in = streaming if isinstance(streaming, bool) else torch.cat([streaming, streaming])

        t_span = self.time_grid(n_timesteps, mu.device)
        # Same accumulation as upstream: t += dt, dt = t_span[k+1] - t.
        t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
        for step in range(1, n_timesteps + 1):
            x_in = torch.cat([x, x]).to(e_dtype)
            past = None if prefix is None else prefix.reader(step - 1, mu.device)
            v = self.estimator(x_in, mask_in, mu_in, t.expand(2 * B), spks_in, cond_in, stream_in, past).float()
            v_cond, v_uncond = v[:B], v[B:]
            v = (1.0 + self.cfg_rate) * v_cond - self.cfg_rate * v_uncond
            x = x + dt * v
            t = t + dt
            if step < n_timesteps:
                dt = t_span[step + 1] - t
                if on_step is not None:
                    on_step()
        return x.float()
