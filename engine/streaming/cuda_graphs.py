"""CUDA graphs for the flow estimator over a grid of (rows, frames) buckets.

One flow call runs the U-Net estimator 10 times on [2B, 80, T] (B streams, 2 CFG rows each); in eager
PyTorch that is about 1,000 kernel launches per call and launch-bound below ~16k rows × frames (H100:
4 ms per step with a graph vs 35-47 ms eager for one stream). The wrapper pads each call to the
smallest bucket (rows ≥ 2B, frames ≥ T) and replays the graph captured for it. Padding is exact for
the real rows and frames: padded frames and rows have mask 0 (attention keys masked, causal
convolutions only look left, the output is multiplied by the mask), so only float rounding of
differently shaped kernels can differ.

Buckets above ``max_elements`` = rows × frames are padded the same way but run eagerly: there the GPU
work outlasts the launches, and the padding keeps the set of shapes small. Calls outside every bucket
run eagerly at their own shape. All graphs share one memory pool and one set of static input/output
buffers (only one call runs at a time), so graph memory is that of the largest graph, not the sum.
With a ``prefix_store`` (engine.flow.prefix), each bucket has a second graph for calls that read it,
with two more inputs, each row's store row and cached frames (padded rows: none); a call that reads
nothing uses the plain graph, which is cheaper. A voice's recording runs as its own graph per frame
count.
On CPU, ``use_graphs=False`` exercises the same padding path without capture (tests). A capture
failure disables graphs for the process (with a warning); the padded eager path remains.
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.flow.prefix import PrefixReader, PrefixRecorder
from engine.hift.hift import lens_tensor, row_lengths, source_cache
from engine.hift.source import SourceNoise, draw_source_noise

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, torch.Tensor]
    out: torch.Tensor | tuple[torch.Tensor, ...]     # static output buffer(s)


def _bucket(sizes: list[int], n: int) -> int | None:
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def bucket_shape(row_sizes: list[int], frame_sizes: list[int], rows: int, frames: int) -> tuple[int, int]:
    """The (rows, frames) an estimator call computes: its (rows, frames) bucket from the sorted
    ``row_sizes`` x ``frame_sizes``, or its own shape when either dimension is beyond them."""
    rb, fb = _bucket(row_sizes, rows), _bucket(frame_sizes, frames)
    return (rows, frames) if rb is None or fb is None else (rb, fb)


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
        self._static: dict[tuple, dict[str, torch.Tensor]] = {}   # (dtype, device) -> flat buffers
        self._pool = None
        self.prefix_store = None  # the PrefixStore that calls with a PrefixReader read (engine.flow.prefix)
        self.replays = 0          # graph replays
        self.padded_calls = 0     # bucketed calls run eagerly (above max_elements, or no graphs)
        self.eager_calls = 0      # calls outside every bucket

    @property
    def cfg(self):
        return self.inner.cfg

    def prefix_layers(self):
        return self.inner.prefix_layers()

    def padded_shape(self, rows: int, frames: int) -> tuple[int, int]:
        """The (rows, frames) a call of that shape computes: its bucket, or its own shape outside them."""
        return bucket_shape(self.rows, self.frames, rows, frames)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, streaming: bool | torch.Tensor = False,
                prefix=None) -> torch.Tensor:
        """x, mu, cond [R, 80, T]; mask [R, 1, T]; t [R]; spks [R, 80]; streaming bool or bool [R];
        prefix None or a PrefixReader (graphed, of ``prefix_store``), or a PrefixRecorder (eager).
        Returns the velocity [R, 80, T] (as ``CausalConditionalDecoder``)."""
        R, C, T = x.shape
        if isinstance(prefix, PrefixRecorder):
            return self._record(x, mask, mu, t, spks, cond, streaming, prefix)
        rb, fb = _bucket(self.rows, R), _bucket(self.frames, T)
        if rb is None or fb is None:
            self.eager_calls += 1
            return self.inner(x, mask, mu, t, spks, cond, streaming, prefix)
        if prefix is not None and prefix.store is not self.prefix_store:
            raise ValueError("the estimator's graphs read another prefix store")
        g = None
        if self.use_graphs and x.is_cuda and rb * fb <= self.max_elements:
            key = (rb, fb, x.dtype, x.device, prefix is not None)
            g = self._graphs.get(key) or self._capture(key, C, spks.shape[1])
        inp = g.inputs if g is not None else self._new_inputs(rb, fb, C, spks.shape[1], x.dtype, x.device,
                                                             prefix is not None)
        _fill(inp, R, x, mask, mu, t, spks, cond, streaming, prefix)
        if g is None:
            self.padded_calls += 1
            out = self._call(inp)
        else:
            g.graph.replay()
            self.replays += 1
            out = g.out
        return out[:R, :, :T].clone()

    def _record(self, x, mask, mu, t, spks, cond, streaming, recorder: PrefixRecorder) -> torch.Tensor:
        """A recording call (engine.flow.prefix): at its own shape, as a graph per frame count."""
        R, C, T = x.shape
        g = None
        if self.use_graphs and x.is_cuda and recorder.store is self.prefix_store:
            key = ("record", R, T, x.dtype, x.device)
            g = self._graphs.get(key) or self._capture(key, C, spks.shape[1])
        if g is None:
            self.eager_calls += 1
            return self.inner(x, mask, mu, t, spks, cond, streaming, recorder)
        _fill(g.inputs, R, x, mask, mu, t, spks, cond, streaming)
        g.inputs["record_rows"].copy_(recorder.rows)
        g.graph.replay()
        self.replays += 1
        return g.out.clone()

    def _call(self, inp: dict[str, torch.Tensor]) -> torch.Tensor:
        """The wrapped estimator on a graph's inputs (with a reader over its prefix rows, or a recorder)."""
        args = {k: v for k, v in inp.items() if k not in ("past_rows", "past_frames", "record_rows")}
        if "past_rows" in inp:
            args["prefix"] = PrefixReader(self.prefix_store, inp["past_rows"], inp["past_frames"])
        if "record_rows" in inp:
            args["prefix"] = PrefixRecorder(self.prefix_store, inp["record_rows"])
        return self.inner(**args)

    def _new_inputs(self, rb: int, fb: int, channels: int, spk_dim: int, dtype, device, prefixed: bool):
        return {k: torch.zeros(shape, dtype=_DTYPES.get(k, dtype), device=device)
                for k, shape in _shapes(rb, fb, channels, spk_dim, prefixed).items() if k != "out"}

    def _static_views(self, rb: int, fb: int, channels: int, spk_dim: int, dtype, device,
                      prefixed: bool) -> dict[str, torch.Tensor]:
        """Contiguous [rb, ·, fb] views of the flat buffers shared by every graph (and the output)."""
        flat = self._static.get((dtype, device))
        if flat is None:
            sizes: dict[str, int] = {}
            for r in self.rows:
                for f in self.frames:
                    if r * f <= self.max_elements:
                        for k, shape in _shapes(r, f, channels, spk_dim, True).items():
                            sizes[k] = max(sizes.get(k, 0), math.prod(shape))
            flat = self._static[(dtype, device)] = {
                k: torch.zeros(n, dtype=_DTYPES.get(k, dtype), device=device) for k, n in sizes.items()}
        return {k: flat[k][:math.prod(shape)].view(shape)
                for k, shape in _shapes(rb, fb, channels, spk_dim, prefixed).items()}

    @torch.inference_mode()
    def _capture(self, key, channels: int, spk_dim: int) -> _Graph | None:
        """Capture the graph of ``key``: (rows, frames, dtype, device, prefixed) for a bucket (shared
        static buffers), or ("record", rows, frames, dtype, device) for recording (its own buffers)."""
        if key[0] == "record":
            _, rb, fb, dtype, device = key
            inp = self._new_inputs(rb, fb, channels, spk_dim, dtype, device, False)
            inp["record_rows"] = self.prefix_store.scratch_rows(device)    # (the capture runs it)
            out_buf = torch.zeros(rb, channels, fb, dtype=dtype, device=device)
        else:
            rb, fb, dtype, device, prefixed = key
            inp = self._static_views(rb, fb, channels, spk_dim, dtype, device, prefixed)
            out_buf = inp.pop("out")
        try:
            inp["mask"].fill_(1)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # The result is copied into the shared output buffer, so the graph keeps nothing alive in
            # the pool and later captures reuse its memory.
            graph = capture_graph(lambda: out_buf.copy_(self._call(inp)), self._pool, device)
            g = self._graphs[key] = _Graph(graph, inp, out_buf)
            log.debug("captured flow estimator graph rows=%d frames=%d", rb, fb)
            return g
        except Exception as exc:
            log.warning("CUDA graph capture failed for rows=%d frames=%d (%r); running the estimator eagerly",
                        rb, fb, exc)
            self.use_graphs = False
            return None

    def capture_all(self, device: torch.device, dtype: torch.dtype, channels: int = 80, spk_dim: int = 80) -> int:
        """Capture every bucket within ``max_elements`` now (largest first, so the pool is sized once),
        for calls without a prefix and, when ``prefix_store`` is set, for calls through it and its
        recordings. Returns the number of graphs captured."""
        if not self.use_graphs:
            return 0
        device = _with_index(device)
        shapes = sorted(((rb, fb) for rb in self.rows for fb in self.frames if rb * fb <= self.max_elements),
                        key=lambda s: s[0] * s[1], reverse=True)
        n = 0
        for rb, fb in shapes:
            for prefixed in (False, True) if self.prefix_store is not None else (False,):
                key = (rb, fb, dtype, device, prefixed)
                if key not in self._graphs:
                    if self._capture(key, channels, spk_dim) is None:
                        return n
                    n += 1
        store = self.prefix_store
        for frames in range(self.cfg.static_chunk_size, (store.frames if store else 0) + 1, self.cfg.static_chunk_size):
            if self._capture(("record", 2, frames, dtype, device), channels, spk_dim) is None:
                return n
            n += 1
        return n


def _with_index(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:N`` (the current device), as tensors report it: graphs are keyed by the
    device of the call's tensors, and ``torch.device("cuda") != torch.device("cuda:0")``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def capture_graph(fn: Callable[[], object], pool, device: torch.device) -> "torch.cuda.CUDAGraph":
    """Run ``fn`` twice on a side stream (allocator and kernel selection), then capture one call of it
    into a new CUDA graph that allocates from ``pool``. ``fn`` must read and write static buffers only."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the LLM backend may use the GPU from its own thread meanwhile.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph


_DTYPES = {"t": torch.float32, "streaming": torch.bool, "past_rows": torch.long, "past_frames": torch.long}
# (the other inputs: the estimator's dtype)


def _shapes(rb: int, fb: int, channels: int, spk_dim: int, prefixed: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of a bucket's estimator inputs, and of its output ("out")."""
    shapes = {"x": (rb, channels, fb), "mask": (rb, 1, fb), "mu": (rb, channels, fb), "t": (rb,),
              "spks": (rb, spk_dim), "cond": (rb, channels, fb), "streaming": (rb,), "out": (rb, channels, fb)}
    if prefixed:
        shapes.update(past_rows=(rb,), past_frames=(rb,))
    return shapes


def _put(buf: torch.Tensor, value: torch.Tensor | bool, rows: int, pad: int | bool = 0) -> None:
    """Set a bucket buffer to ``pad``, then write a call's ``value`` into its leading corner (a tensor
    of at most the buffer's shape, or one bool/number for the first ``rows`` rows)."""
    buf.fill_(pad)
    if isinstance(value, torch.Tensor):
        buf[tuple(slice(0, n) for n in value.shape)].copy_(value)
    else:
        buf[:rows].fill_(value)


def _fill(inp: dict[str, torch.Tensor], R: int, x, mask, mu, t, spks, cond, streaming, prefix=None) -> None:
    """Copy a call's [R, ·, T] inputs into bucket buffers; everything else becomes 0 (mask 0: padding;
    padded rows read no prefix)."""
    t = t.reshape(-1).expand(R) if t.numel() == 1 else t
    for name, value in (("x", x), ("mask", mask), ("mu", mu), ("cond", cond), ("t", t), ("spks", spks),
                        ("streaming", streaming)):
        _put(inp[name], value, R)
    if prefix is not None:
        _put(inp["past_rows"], prefix.rows, R)
        _put(inp["past_frames"], prefix.frames, R)


class _SmallCallGraphs(nn.Module):
    """What the graph wrappers of small encoder and HiFT calls share: the wrapped module, the
    (rows, size) buckets, one graph pool per wrapper and the capture with its eager fallback."""

    def __init__(self, inner: nn.Module, rows: list[int], sizes: list[int], use_graphs: bool):
        super().__init__()
        self.inner = inner
        self.rows, self.sizes = sorted(rows), sorted(sizes)
        self.use_graphs = use_graphs
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self.replays = 0

    def _record(self, key: tuple, inputs: dict[str, torch.Tensor], out, fn: Callable[[], object]) -> _Graph | None:
        """Capture ``fn`` (reads ``inputs``, writes ``out``) as the graph of bucket ``key`` (device last);
        on failure log, run this wrapper eagerly from now on and return None."""
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = capture_graph(fn, self._pool, key[-1])
        except Exception as exc:
            log.warning("CUDA graph capture of %s failed for bucket %s (%r); running it eagerly",
                        type(self.inner).__name__, key[:2], exc)
            self.use_graphs = False
            return None
        g = self._graphs[key] = _Graph(graph, inputs, out)
        return g


class GraphedEncoder(_SmallCallGraphs):
    """Drop-in for the flow's ``UpsampleConformerEncoder`` (same ``forward``) that replays a CUDA graph
    for small calls. One stream's encoder pass is ~400 small kernels (H100: 14 ms eager, launch-bound,
    a quarter of a first chunk's flow call); larger batches are GPU-bound and stay eager.

    A call of B rows of at most T tokens, with lookahead context, is padded to the smallest
    (rows, tokens) bucket: padded frames and rows are masked like a shorter row of a batch (padded rows
    get length 1 and no context), so only float rounding of differently shaped kernels can differ.
    ``use_graphs=False`` runs the same padding eagerly (CPU tests). Each bucket has its own buffers.
    """

    def __init__(self, encoder: nn.Module, rows: list[int], tokens: list[int], use_graphs: bool = True):
        super().__init__(encoder, rows, tokens, use_graphs)

    @torch.inference_mode()
    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, context: torch.Tensor | None = None,
                has_context: torch.Tensor | None = None,
                streaming: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = xs.shape
        rb, tb = _bucket(self.rows, B), _bucket(self.sizes, T)
        if rb is None or tb is None or context is None or context.size(1) == 0:
            return self.inner(xs, xs_lens, context, has_context, streaming)
        key = (rb, tb, xs.dtype, xs.device)
        g = None
        if self.use_graphs and xs.is_cuda:
            g = self._graphs.get(key) or self._capture(key, D, context.size(1))
        inp = g.inputs if g is not None else self._new_inputs(key, D, context.size(1))
        _put(inp["xs_lens"], xs_lens, B, pad=1)        # padded rows: length 1, no context
        for name, value in (("xs", xs), ("context", context), ("streaming", streaming),
                            ("has_context", True if has_context is None else has_context)):
            _put(inp[name], value, B)
        if g is None:
            h = self.inner(**inp)[0]
        else:
            g.graph.replay()
            self.replays += 1
            h = g.out
        up = self.inner.up_stride
        return h[:B, :up * T].clone(), xs_lens * up

    def _new_inputs(self, key, dim: int, lookahead: int) -> dict[str, torch.Tensor]:
        rb, tb, dtype, device = key
        return {"xs": torch.zeros(rb, tb, dim, dtype=dtype, device=device),
                "xs_lens": torch.ones(rb, dtype=torch.long, device=device),
                "context": torch.zeros(rb, lookahead, dim, dtype=dtype, device=device),
                "has_context": torch.zeros(rb, dtype=torch.bool, device=device),
                "streaming": torch.zeros(rb, dtype=torch.bool, device=device)}

    @torch.inference_mode()
    def _capture(self, key, dim: int, lookahead: int) -> _Graph | None:
        rb, tb, dtype, device = key
        inp = self._new_inputs(key, dim, lookahead)
        out = torch.zeros(rb, self.inner.up_stride * tb, self.inner.output_size(), dtype=dtype, device=device)
        return self._record(key, inp, out, lambda: out.copy_(self.inner(**inp)[0]))

    def capture_all(self, device: torch.device, dtype: torch.dtype = torch.float32, lookahead: int = 3) -> int:
        """Capture every bucket now (engine start); returns how many were captured."""
        dim, device = self.inner.embed.out[0].in_features, _with_index(device)
        n = 0
        for rb in self.rows:
            for tb in self.sizes:
                if self.use_graphs and (rb, tb, dtype, device) not in self._graphs:
                    n += self._capture((rb, tb, dtype, device), dim, lookahead) is not None
        return n


def install_graphed_encoder(flow: nn.Module, rows: list[int], tokens: list[int],
                            use_graphs: bool = True) -> GraphedEncoder:
    """Replace ``flow.encoder`` by a ``GraphedEncoder`` around it (after loading weights)."""
    if not isinstance(flow.encoder, GraphedEncoder):
        flow.encoder = GraphedEncoder(flow.encoder, rows, tokens, use_graphs)
    return flow.encoder


class GraphedHiFT(_SmallCallGraphs):
    """Drop-in for ``HiFTGenerator`` in ``engine.token2wav.vocode_batch`` (``inference``,
    ``samples_per_frame``) that replays a CUDA graph of the deterministic part (``render``) for small
    calls. One stream's HiFT call is launch-bound eager (H100: ~17 ms for 30-100 frames).

    The source noise is drawn eagerly with each row's generator, as before; a call of B rows of at
    most T frames is then padded to the smallest (rows, frames) bucket: padded frames are masked like
    a shorter row of a batch, padded rows get length 1, no noise and no cache. ``use_graphs=False``
    runs the same padding eagerly (CPU tests). Each bucket has its own buffers.
    """

    def __init__(self, hift: nn.Module, rows: list[int], frames: list[int], use_graphs: bool = True):
        super().__init__(hift, rows, frames, use_graphs)

    @property
    def samples_per_frame(self) -> int:
        return self.inner.samples_per_frame

    @torch.no_grad()
    def inference(self, mel: torch.Tensor, mel_lens=None, cache_source=None, generators=None):
        """As ``HiFTGenerator.inference``."""
        B, _, T = mel.shape
        rb, fb = _bucket(self.rows, B), _bucket(self.sizes, T)
        if rb is None or fb is None:
            return self.inner.inference(mel, mel_lens, cache_source, generators)
        lens = row_lengths(mel_lens, B, T) or [T] * B
        spf, device = self.samples_per_frame, mel.device
        draws = draw_source_noise(B, T * spf, self.inner.m_source.dim, device, generators, [n * spf for n in lens])
        cache, cache_lens = source_cache(cache_source, B, device)
        key = (rb, fb, 0 if cache is None else cache.shape[1], mel.dtype, device)
        g = None
        if self.use_graphs and mel.is_cuda:
            g = self._graphs.get(key) or self._capture(key)
        inp = g.inputs if g is not None else self._new_inputs(key)
        _put(inp["lens"], lens_tensor(lens, device), B, pad=1)     # padded rows: length 1, no noise
        for name, value in (("mel", mel), ("rand_ini", draws.rand_ini), ("noise", draws.noise),
                            ("cache", cache), ("cache_lens", cache_lens)):
            if value is not None:
                _put(inp[name], value, B)
        if g is None:
            speech, source = self._render(inp)
        else:
            g.graph.replay()
            self.replays += 1
            speech, source = g.out
        return speech[:B, :T * spf].clone(), source[:B, :, :T * spf].clone()

    def _render(self, inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.render(inp["mel"], inp["lens"], SourceNoise(inp["rand_ini"], inp["noise"]),
                                 inp.get("cache"), inp.get("cache_lens"))

    def _new_inputs(self, key) -> dict[str, torch.Tensor]:
        rb, fb, n_cache, dtype, device = key
        mels, harmonics = self.inner.cfg.in_channels, self.inner.m_source.dim
        inp = {"mel": torch.zeros(rb, mels, fb, dtype=dtype, device=device),
               "lens": torch.ones(rb, dtype=torch.long, device=device),
               "rand_ini": torch.zeros(rb, harmonics, device=device),
               "noise": torch.zeros(rb, fb * self.samples_per_frame, harmonics, device=device)}
        if n_cache:
            inp["cache"] = torch.zeros(rb, n_cache, device=device)
            inp["cache_lens"] = torch.zeros(rb, dtype=torch.long, device=device)
        return inp

    @torch.no_grad()
    def _capture(self, key) -> _Graph | None:
        rb, fb, n_cache, dtype, device = key
        inp = self._new_inputs(key)
        n = fb * self.samples_per_frame
        out = (torch.zeros(rb, n, dtype=dtype, device=device), torch.zeros(rb, 1, n, dtype=dtype, device=device))

        def render_into_out() -> None:
            speech, source = self._render(inp)
            out[0].copy_(speech)
            out[1].copy_(source)
        return self._record(key, inp, out, render_into_out)

    def capture_all(self, device: torch.device, cache_samples: int) -> int:
        """Capture every bucket now, for calls with and without a ``cache_samples`` source cache."""
        device, n = _with_index(device), 0
        for rb in self.rows:
            for fb in self.sizes:
                for n_cache in (0, cache_samples):
                    key = (rb, fb, n_cache, torch.float32, device)
                    if self.use_graphs and key not in self._graphs:
                        n += self._capture(key) is not None
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
