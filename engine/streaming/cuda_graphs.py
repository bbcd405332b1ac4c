"""CUDA graphs for the flow estimator over a small set of (rows, frames) buckets.

One flow call runs the U-Net estimator 10 times on [2B, 80, T] (B streams, 2 CFG rows each); in eager
PyTorch that is about 1,000 kernel launches per call and launch-bound for small batches. The wrapper
pads each call to the smallest bucket (rows ≥ 2B, frames ≥ T), copies the inputs into the bucket's
static buffers and replays the graph captured for it. Padding is exact for the real rows and frames:
padded frames and rows have mask 0 (attention keys masked, causal convolutions only look left, the
output is multiplied by the mask), so only float rounding of differently shaped kernels can differ.

Calls outside every bucket, or above ``max_elements`` = rows × frames (graph memory grows with the
[rows, T, T] attention bias), run eagerly. On CPU, ``use_graphs=False`` exercises the same padding
path without capture (tests). A capture failure disables graphs for the process and falls back to
eager execution with a warning.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph | None"
    inputs: dict[str, torch.Tensor]
    out: torch.Tensor | None


def _bucket(sizes: list[int], n: int) -> int | None:
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class GraphedEstimator(nn.Module):
    """Drop-in for ``CausalConditionalDecoder``: same ``forward(x, mask, mu, t, spks, cond, streaming)``."""

    def __init__(self, estimator: nn.Module, rows: list[int], frames: list[int], max_elements: int,
                 use_graphs: bool = True):
        super().__init__()
        self.inner = estimator
        self.rows, self.frames = sorted(rows), sorted(frames)
        self.max_elements = max_elements
        self.use_graphs = use_graphs
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self.replays = 0
        self.eager_calls = 0

    @property
    def cfg(self):
        return self.inner.cfg

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, streaming: bool | torch.Tensor = False) -> torch.Tensor:
        """x, mu, cond [R, 80, T]; mask [R, 1, T]; t [R]; spks [R, 80]; streaming bool or bool [R].
        Returns the velocity [R, 80, T] (as ``CausalConditionalDecoder``)."""
        R, C, T = x.shape
        rb, fb = _bucket(self.rows, R), _bucket(self.frames, T)
        if rb is None or fb is None or rb * fb > self.max_elements or (self.use_graphs and not x.is_cuda):
            self.eager_calls += 1
            return self.inner(x, mask, mu, t, spks, cond, streaming)
        key = (rb, fb, x.dtype, x.device)
        g = self._graphs.get(key)
        if g is None:
            g = self._make(key, C, spks.shape[1])
            if g is None:
                self.eager_calls += 1
                return self.inner(x, mask, mu, t, spks, cond, streaming)
        inp = g.inputs
        for name, src in (("x", x), ("mask", mask), ("mu", mu), ("cond", cond)):
            buf = inp[name]
            buf.zero_()
            buf[:R, :, :T].copy_(src)
        inp["t"].zero_()
        inp["t"][:R].copy_(t.reshape(-1).expand(R) if t.numel() == 1 else t)
        inp["spks"].zero_()
        inp["spks"][:R].copy_(spks)
        inp["streaming"].fill_(False)
        if isinstance(streaming, bool):
            inp["streaming"][:R].fill_(streaming)
        else:
            inp["streaming"][:R].copy_(streaming)
        if g.graph is None:                       # padding only (CPU tests)
            out = self.inner(**inp)
        else:
            g.graph.replay()
            out = g.out
            self.replays += 1
        return out[:R, :, :T].clone()

    @torch.inference_mode()
    def _make(self, key, channels: int, spk_dim: int) -> _Graph | None:
        rb, fb, dtype, device = key
        inp = {"x": torch.zeros(rb, channels, fb, dtype=dtype, device=device),
               "mask": torch.zeros(rb, 1, fb, dtype=dtype, device=device),
               "mu": torch.zeros(rb, channels, fb, dtype=dtype, device=device),
               "t": torch.zeros(rb, dtype=torch.float32, device=device),
               "spks": torch.zeros(rb, spk_dim, dtype=dtype, device=device),
               "cond": torch.zeros(rb, channels, fb, dtype=dtype, device=device),
               "streaming": torch.zeros(rb, dtype=torch.bool, device=device)}
        if not self.use_graphs:
            g = _Graph(None, inp, None)
            self._graphs[key] = g
            return g
        try:
            inp["mask"].fill_(1)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):                 # warm-up: allocator and kernel selection
                    self.inner(**inp)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the LLM backend may use the GPU from its own thread meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.inner(**inp)
            g = _Graph(graph, inp, out)
            self._graphs[key] = g
            log.info("captured flow estimator graph rows=%d frames=%d", rb, fb)
            return g
        except Exception as exc:
            log.warning("CUDA graph capture failed for rows=%d frames=%d (%r); running the estimator eagerly",
                        rb, fb, exc)
            self.use_graphs = False
            self.rows = self.frames = []
            return None

    def capture_all(self, device: torch.device, dtype: torch.dtype, channels: int = 80, spk_dim: int = 80) -> int:
        """Capture every bucket within ``max_elements`` now (largest first, so the pool is sized once)."""
        n = 0
        for rb in reversed(self.rows):
            for fb in reversed(self.frames):
                if rb * fb <= self.max_elements and (rb, fb, dtype, device) not in self._graphs:
                    if self._make((rb, fb, dtype, device), channels, spk_dim) is None:
                        return n
                    n += 1
        return n


def install_graphed_estimator(flow: nn.Module, rows: list[int], frames: list[int], max_elements: int,
                              use_graphs: bool = True) -> GraphedEstimator:
    """Replace ``flow.decoder.estimator`` by a ``GraphedEstimator`` around it (after loading weights and
    choosing the estimator dtype; the flow's state-dict keys then carry an ``inner.`` level)."""
    est = flow.decoder.estimator
    if isinstance(est, GraphedEstimator):
        return est
    wrapped = GraphedEstimator(est, rows, frames, max_elements, use_graphs)
    flow.decoder.estimator = wrapped
    return wrapped
