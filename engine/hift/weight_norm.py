"""Weight-normalised 1-D convolutions with the legacy ``weight_g`` / ``weight_v`` parameter names.

Effective weight ``w = g * v / ||v||`` with the norm over every dim except dim 0 (cosyvoice2.md §4.6).
For a transposed convolution the weight is ``[in, out, k]``, so ``g`` is ``[in, 1, 1]``.

Without autograd the effective weight is computed once and cached on the module; the cache is keyed
by the parameters' version counters, device and dtype, so loading new weights or moving the module
recomputes it automatically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormConv(nn.Module):
    def __init__(self, weight_shape: tuple[int, ...], bias_channels: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(weight_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.zeros(weight_shape))
        self.bias = nn.Parameter(torch.zeros(bias_channels))
        self._folded: tuple[tuple, torch.Tensor] | None = None

    def weight(self) -> torch.Tensor:
        """The effective weight (cached when gradients are off)."""
        if torch.is_grad_enabled():
            return torch._weight_norm(self.weight_v, self.weight_g, 0)
        g, v = self.weight_g, self.weight_v
        key = (g._version, v._version, g.data_ptr(), v.data_ptr(), v.device, v.dtype)
        if self._folded is None or self._folded[0] != key:
            # torch._weight_norm is the kernel the reference uses; it keeps parity bit-exact.
            self._folded = (key, torch._weight_norm(v, g, 0))
        return self._folded[1]

    def drop_folded(self) -> None:
        self._folded = None


class WNConv1d(WeightNormConv):
    """``Conv1d(cin, cout, k, stride, padding, dilation)`` with weight norm; [B, cin, L] -> [B, cout, L']."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__((cout, cin, kernel_size), cout)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(WeightNormConv):
    """``ConvTranspose1d(cin, cout, k, stride, padding)`` with weight norm; [B, cin, L] -> [B, cout, L']."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int = 0):
        super().__init__((cin, cout, kernel_size), cout)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding)
