"""The batched token2wav call: ONE flow call and ONE HiFT call for every stream of a scheduler step.

Per stream it does what upstream ``CosyVoice2Model.token2wav`` does for one uuid: flow over prompt +
``tokens[:token_end]`` (non-final: chunk masks, last 3 tokens as lookahead; final: full masks, all
tokens), keep the mel after ``2·token_offset``, vocode with the stream's HiFT cache (cross-fade,
3840-sample hold-back). ``speed != 1`` stretches each chunk's new mel by linear interpolation.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.flow.prefix import PrefixRows, VoicePrefixCache
from engine.scheduler import CallItem, FlowPrompt
from engine.streaming.policy import ChunkPlan, row_padded_cost
from engine.token2wav import VocodeItem, vocode_batch


class BatchedToken2Wav:
    """``engine.scheduler.Token2WavRunner`` over a flow (``inference_batch``) and a HiFT generator.

    With a ``prefix_cache``, the non-final rows of a call continue their voice's cached first frames
    (engine.flow.prefix); a voice not in the cache is recorded first, inside the call."""

    def __init__(self, flow, hift, device: torch.device | str = "cpu", lookahead: int = 3,
                 token_mel_ratio: int = 2, prefix_cache: VoicePrefixCache | None = None):
        self.flow, self.hift = flow, hift
        self.device = torch.device(device)
        self.lookahead, self.ratio = lookahead, token_mel_ratio
        self.prefix_cache = prefix_cache
        self._slots_in_use: list[set[int]] = []    # per flow call in flight (a preempting call nests)
        self.last_phases: dict[str, float] = {}    # seconds per phase of the last run (PhaseTimer)

    def cached_frames(self, prompt: FlowPrompt, plan: ChunkPlan) -> int:
        """Leading flow frames of ``plan`` read from the prefix cache instead of computed."""
        if self.prefix_cache is None or plan.final:
            return 0
        return min(self.flow.prefix_frames(int(prompt.tokens.shape[0])), self.prefix_cache.store.frames)

    def _prefix_rows(self, items: list[CallItem]) -> PrefixRows | None:
        """Each item's slot and cached frames, recording voices the cache lacks; None when no row
        reads the cache (the plain estimator graphs are cheaper)."""
        if self.prefix_cache is None:
            return None
        slots, frames = [], []
        in_use = set().union(*self._slots_in_use)
        for it in items:
            p = it.prompt
            slot, n = 0, 0
            if not it.plan.final:
                slot, n = self.prefix_cache.lookup(
                    p.key, self.cached_frames(p, it.plan), in_use,
                    lambda slot, n: self.flow.record_prefix(self.prefix_cache.store, slot, p.tokens, p.feat,
                                                            p.embedding.to(self.device), n))
                if n:
                    in_use.add(slot)
            slots.append(slot)
            frames.append(n)
        return PrefixRows(self.prefix_cache.store, slots, frames) if any(frames) else None

    def padded_cost(self, streams: int, frames: int) -> int:
        """Stream-frames a flow call of ``streams`` streams of at most ``frames`` mel frames computes
        (the estimator's CUDA-graph bucket, 2 CFG rows per stream)."""
        est = getattr(getattr(self.flow, "decoder", None), "estimator", None)
        if not hasattr(est, "padded_shape"):
            return row_padded_cost(streams, frames)
        rows, padded_frames = est.padded_shape(2 * streams, frames)
        return rows * padded_frames // 2

    @torch.inference_mode()
    def run(self, items: list[CallItem], between: Callable[[], None] | None = None
            ) -> list[tuple[np.ndarray, object]]:
        """float32 24 kHz samples and the new HiFT cache (None after a final call) per item.

        ``between`` is called between the flow's Euler steps, when the GPU has finished all but the
        last queued step: it may run another (short) ``run`` on this thread, whose work then goes
        ahead of the rest of this call."""
        if not items:
            return []
        timer = PhaseTimer(self.device)
        prefix = self._prefix_rows(items)
        self._slots_in_use.append({s for s, n in zip(prefix.slots, prefix.frames) if n} if prefix else set())
        try:
            mels = self.flow.inference_batch(
                tokens=[it.tokens for it in items],
                prompt_tokens=[it.prompt.tokens for it in items],
                prompt_feats=[it.prompt.feat for it in items],
                embeddings=torch.stack([it.prompt.embedding.reshape(-1) for it in items]).to(self.device),
                streaming=[not it.plan.final for it in items],
                finalize=[it.plan.final for it in items],
                on_step=None if between is None else _after_gpu_catches_up(between, self.device),
                prefix=prefix)
        finally:
            self._slots_in_use.pop()
        vitems = []
        for it, mel in zip(items, mels):
            new = mel[:, self.ratio * it.plan.token_offset:]
            if it.speed != 1.0 and new.shape[1] > 0:
                frames = max(1, int(new.shape[1] / it.speed))
                new = F.interpolate(new[None], size=frames, mode="linear", align_corners=False)[0]
            vitems.append(VocodeItem(mel=new, cache=it.cache, finalize=it.plan.final, generator=it.generator))
        timer.mark("flow")
        audio = vocode_batch(self.hift, vitems)      # ends with a device->host copy: all work is done
        timer.mark("hift")
        self.last_phases = timer.seconds()
        return [(a, v.cache) for a, v in zip(audio, vitems)]

    @torch.inference_mode()
    def warmup(self, prompt_tokens: int = 75, tokens: int = 40) -> None:
        """One small call of a silent voice, a non-final and a final chunk (first-call allocations,
        kernel selection, lazy caches, the prefix cache's recording); the prefix cache forgets it."""
        g = torch.Generator(device=self.device)
        g.manual_seed(0)
        voice = FlowPrompt(torch.zeros(prompt_tokens, dtype=torch.long), torch.zeros(2 * prompt_tokens, 80),
                           torch.ones(192))
        toks = torch.zeros(tokens, dtype=torch.long)
        self.run([CallItem(voice, toks, ChunkPlan(tokens, 0, final), None, g) for final in (False, True)])
        if self.prefix_cache is not None:
            self.prefix_cache.clear()


def _after_gpu_catches_up(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``fn`` wrapped to run once the GPU has finished everything queued before the previous call,
    so the host stays one Euler step ahead instead of queueing the whole solve at once (a call made
    by ``fn`` then waits behind one step, not behind the solve)."""
    if device.type != "cuda":
        return fn
    queued: deque = deque()

    def wrapped() -> None:
        ev = torch.cuda.Event()
        ev.record()
        queued.append(ev)
        if len(queued) > 1:
            queued.popleft().synchronize()
        fn()
    return wrapped


class PhaseTimer:
    """Seconds between marks, as the device executed them: CUDA events on the current stream (no
    synchronisation until ``seconds``), wall time on CPU. A CUDA span includes the GPU waiting for
    launches and time lost to other processes on the card."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def mark(self, name: str) -> None:
        self.marks.append((name, self._now()))

    def seconds(self) -> dict[str, float]:
        """{name: seconds since the previous mark}."""
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) / 1000 if self.cuda else b - a
        return out
