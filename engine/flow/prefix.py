"""A per-voice cache of the flow estimator's work on the leading prompt frames of streaming calls.

In a streaming (non-final) flow call, the first ``C`` mel frames depend on the voice alone: the
encoder and the estimator attend block-causally (25 tokens = 50 frames), their convolutions are
causal, the lookahead reaches 3 tokens ahead and the ODE starts from the same fixed noise. With ``P``
prompt tokens, ``C = 50 · (⌊(P − 28) / 25⌋ + 1)`` (``voice_prefix_frames``; P = 75, a 3 s prompt: 100
of its 150 frames).

So for each Euler step and CFG row, the keys and values of every attention layer and the last two
inputs of every causal convolution at those frames are the same in every streaming call of the voice.
``PrefixStore`` keeps them on the device for a few voices (recorded once, by solving the voice's first
``C`` frames alone); a call then computes only frames ``C..T`` of its rows and reads the rest from the
store (``PrefixReader``). The result equals the full computation up to float rounding.

Store layout, per voice slot: ``steps × 2`` CFG rows ("row ids" ``(slot · steps + step) · 2 + cfg``,
cfg 0 = conditional, 1 = unconditional). Memory per voice and cached frame: layers × 2 × steps × 2 ×
inner × dtype bytes (the released model in bfloat16: 56 × 2 × 10 × 2 × 512 × 2 = 2.3 MB), for
``frames`` rounded up to 16 (``PrefixStore.keys``: 112 for 100).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.tensors import upload


def voice_prefix_frames(prompt_tokens: int, block_tokens: int = 25, lookahead: int = 3, token_mel_ratio: int = 2) -> int:
    """Leading mel frames of a streaming flow call that depend only on a voice of ``prompt_tokens``
    prompt tokens: whole encoder blocks (``block_tokens``, the estimator's blocks are the same frames)
    whose last token's lookahead stays inside the prompt."""
    blocks = (prompt_tokens - lookahead - block_tokens) // block_tokens + 1
    return max(0, blocks) * block_tokens * token_mel_ratio


class PrefixStore:
    """Device tensors holding, per voice slot, Euler step and CFG row, the keys and values of each
    attention layer at the first ``frames`` frames and the last 2 inputs of each causal k=3 conv.
    Build it after the estimator's weights are loaded: it keeps a fused copy of the key and value
    projections."""

    def __init__(self, estimator: nn.Module, slots: int, frames: int, steps: int):
        attentions, convs = estimator.prefix_layers()
        p = next(estimator.parameters())
        n = slots * steps * 2 + 2          # + 2 scratch rows (``scratch_rows``)
        heads, head_dim = attentions[0].heads, attentions[0].head_dim
        block = estimator.cfg.static_chunk_size
        self.slots, self.frames, self.steps = slots, frames // block * block, steps
        # Keys per row, padded to a multiple of 16: a call's attention then spans keys + (a bucket of
        # 32·k frames), the alignment SDPA's fused kernels want for their mask. The padding is masked.
        self.keys = -(-self.frames // 16) * 16
        self.attention_index = {id(m): i for i, m in enumerate(attentions)}
        self.conv_index = {id(m): i for i, m in enumerate(convs)}
        # [layer, key/value, row id, head, frame, head_dim]
        self.kv = torch.zeros(len(attentions), 2, n, heads, self.keys, head_dim, dtype=p.dtype, device=p.device)
        # each layer's key and value projections as one matrix: one GEMM and one copy per layer
        with torch.no_grad():
            self.kv_weight = [torch.cat([m.to_k.weight, m.to_v.weight]) for m in attentions]
        # [row id, flattened (in_channels, k-1) of each conv in turn]: read once per call (``PrefixReader``)
        widths = [c.in_channels * (c.kernel_size[0] - 1) for c in convs]
        self.tail_spans = [(e - w, e) for w, e in zip(widths, itertools.accumulate(widths))]
        self.tails = torch.zeros(n, sum(widths), dtype=p.dtype, device=p.device)

    def row(self, slot: int, step: int) -> int:
        """The conditional CFG row id of ``slot`` at Euler step ``step`` (the unconditional is the next)."""
        return (slot * self.steps + step) * 2

    def scratch_rows(self, device) -> torch.Tensor:
        """Two row ids no voice uses (e.g. what a graph capture's warm-up runs may overwrite)."""
        n = self.row(self.slots, 0)
        return torch.tensor([n, n + 1], device=device)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.kv, self.tails, *self.kv_weight])

    def project(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [R, T, dim] (an attention layer's input) -> its keys and values [2, R, heads, T, head_dim]
        (a view)."""
        R, T, _ = x.shape
        kv = F.linear(x, self.kv_weight[self.attention_index[id(layer)]])
        return kv.view(R, T, 2, layer.heads, layer.head_dim).permute(2, 0, 3, 1, 4)


@dataclass
class PrefixReader:
    """Continues rows from the store: row r's frames 0.. of this call are its frames ``frames[r]``..
    of the sequence, and the store's rows ``rows[r]`` hold what comes before (``frames[r]`` = 0: nothing).
    Tensors only, so a CUDA graph can capture a call that reads through it."""
    store: PrefixStore
    rows: torch.Tensor        # long [R] row ids
    frames: torch.Tensor      # long [R] cached frames per row, multiples of 50, <= store.frames

    def __post_init__(self):
        live = (self.frames > 0).to(self.store.tails.dtype).unsqueeze(1)    # uncached rows: zeros
        self._tails = self.store.tails.index_select(0, self.rows) * live

    def keys_values(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, T, dim] (the layer's input) -> keys, values [R, heads, store.keys + T, head_dim]:
        the cached ones first."""
        i = self.store.attention_index[id(layer)]
        kv = torch.cat([self.store.kv[i].index_select(1, self.rows), self.store.project(layer, x)], dim=3)
        return kv[0], kv[1]

    def past_allowed(self, T: int) -> torch.Tensor:
        """bool [R, T, store.keys]: which cached keys each of this call's T queries sees."""
        key = torch.arange(self.store.keys, device=self.frames.device) < self.frames.unsqueeze(1)
        return key.unsqueeze(1).expand(-1, T, -1)

    def left_context(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [R, C, T] (a causal conv's input) -> [R, C, k-1+T]: the cached inputs before frame 0
        (zeros for uncached rows, as the conv's own padding)."""
        a, b = self.store.tail_spans[self.store.conv_index[id(conv)]]
        return torch.cat([self._tails[:, a:b].view(x.size(0), x.size(1), -1), x], dim=2)


@dataclass
class PrefixRecorder:
    """Runs a voice's first frames alone (2 rows: conditional, unconditional; exactly the frames to
    record, no padding) as a plain call and writes what later calls read into the store's ``rows``.
    Tensors only, so a CUDA graph can capture a call that records through it."""
    store: PrefixStore
    rows: torch.Tensor        # long [2] row ids

    def keys_values(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.store.project(layer, x)
        self.store.kv[self.store.attention_index[id(layer)], :, :, :, :x.size(1)].index_copy_(1, self.rows, kv)
        return kv[0], kv[1]

    def past_allowed(self, T: int) -> None:
        return None

    def left_context(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        pad = conv.kernel_size[0] - 1
        x = F.pad(x, (pad, 0))
        a, b = self.store.tail_spans[self.store.conv_index[id(conv)]]
        self.store.tails[:, a:b].index_copy_(0, self.rows, x[:, :, -pad:].reshape(x.size(0), -1))
        return x


@dataclass
class PrefixRows:
    """What a batched flow call of B streams takes from the store: per row its voice slot and its
    cached frames (0 = the row is computed whole)."""
    store: PrefixStore
    slots: list[int]
    frames: list[int]
    _rows: torch.Tensor | None = field(default=None, init=False, repr=False)     # step 0's, on the device
    _frames: torch.Tensor | None = field(default=None, init=False, repr=False)

    def reader(self, step: int, device: torch.device) -> PrefixReader:
        """The reader for Euler step ``step`` (0-based) over the call's 2B CFG rows."""
        if self._rows is None:
            first = [self.store.row(slot, 0) for slot in self.slots]
            self._rows = upload(first + [r + 1 for r in first], torch.long, device)
            self._frames = upload(self.frames + self.frames, torch.long, device)
        return PrefixReader(self.store, self._rows + 2 * step, self._frames)   # = store.row(slot, step)


@dataclass
class PrefixRecording:
    """A flow call of one row (a voice's first cacheable frames alone) that records into ``slot``."""
    store: PrefixStore
    slot: int
    frames = (0,)               # the call starts at frame 0

    def reader(self, step: int, device: torch.device) -> PrefixRecorder:
        row = self.store.row(self.slot, step)
        return PrefixRecorder(self.store, upload([row, row + 1], torch.long, device))


class VoicePrefixCache:
    """Which voices the ``PrefixStore`` holds: a slot per voice key, least recently used first out.

    ``record(slot, frames)`` is the caller's: it must fill the slot (see ``CausalMaskedDiffWithXvec.
    record_prefix``) before a call reads it."""

    def __init__(self, store: PrefixStore):
        self.store = store
        self._slots: OrderedDict[object, tuple[int, int]] = OrderedDict()   # key -> (slot, frames)

    def clear(self) -> None:
        """Forget every voice (their slots are free again)."""
        self._slots.clear()

    def lookup(self, key: object, frames: int, keep: set[int], record) -> tuple[int, int]:
        """(slot, cached frames) for the voice ``key`` whose prefix has ``frames`` voice-only frames
        (capped to the store); records it into the least recently used slot not in ``keep`` when new.
        Returns (0, 0) when the voice has no cacheable frame or every slot is in ``keep``."""
        frames = min(frames, self.store.frames)
        if frames <= 0:
            return 0, 0
        hit = self._slots.get(key)
        if hit is not None:
            self._slots.move_to_end(key)
            return hit
        used = {s for s, _ in self._slots.values()}
        free = [s for s in range(self.store.slots) if s not in used]
        if not free:
            victim = next((k for k, (s, _) in self._slots.items() if s not in keep), None)
            if victim is None:
                return 0, 0
            free = [self._slots.pop(victim)[0]]
        record(free[0], frames)
        self._slots[key] = (free[0], frames)
        return free[0], frames
