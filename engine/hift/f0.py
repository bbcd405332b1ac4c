"""``ConvRNNF0Predictor``: mel -> f0 in Hz (cosyvoice2.md §4.2; non-causal, 3-tap convolutions)."""
from __future__ import annotations

import torch
from torch import nn

from engine.config import F0PredictorConfig
from engine.hift.weight_norm import WNConv1d

NUM_LAYERS = 5


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded time steps of ``x`` [B, C, L] (``mask`` [B, 1, L], 1 = real); no-op for None."""
    return x if mask is None else x * mask


class ConvRNNF0Predictor(nn.Module):
    def __init__(self, cfg: F0PredictorConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(NUM_LAYERS):
            layers += [WNConv1d(cfg.in_channels if i == 0 else cfg.cond_channels, cfg.cond_channels, 3,
                                padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # keys condnet.{0,2,4,6,8}
        self.classifier = nn.Linear(cfg.cond_channels, cfg.num_class)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mel [B, 80, T] -> f0 [B, T] (Hz, >= 0).

        ``mask`` [B, 1, T] marks real frames of padded rows; padded frames are zeroed before each
        convolution so that every real frame equals the unpadded computation."""
        x = masked(mel, mask)
        for i in range(0, len(self.condnet), 2):
            x = self.condnet[i + 1](self.condnet[i](x))
            if i + 2 < len(self.condnet):
                x = masked(x, mask)
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))
