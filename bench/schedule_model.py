"""A model of the streaming scheduler under engine_bench's workload, on a virtual clock.

Not a measurement. It runs the real ``Scheduler`` (chunk policy, deadline order, packing, preemption)
and the real segmenter on engine_bench's texts and arrival times, but:

* each token2wav call costs what ``CallCost`` says, fitted to the H100's ``flow_profile``
  (bench/results/h100-2026-11-25f-flow-profile.md) and scaled by ``gpu_share`` for the GPU time that
  vLLM's process takes;
* the LLM delivers a segment's tokens at a fixed rate after a fixed first-token delay.

Use it to choose the scheduler settings that are worth a GPU run. ``bench/RESULTS.md`` holds the
measurements.

    python -m bench.schedule_model --concurrency 1,16,64,128 [--set urgent_frame_budget=4096 ...]

The voice prefix cache counts as the engine configures it (off by default; `--set prefix_cache_voices=4`: on;
its per-step overhead on a card, bench/RESULTS.md, is not modelled).
"""
from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from bench.engine_bench import chatbot_text, fragments
from engine.engine import EngineConfig
from engine.flow.prefix import voice_prefix_frames
from engine.frontend.segmenter import StreamingSegmenter
from engine.scheduler import ChunkOut, FlowPrompt, Scheduler, SchedulerConfig, StreamSpec
from engine.streaming.cuda_graphs import bucket_shape
from engine.streaming.policy import PlaybackClock, chunk_samples, flow_cost_frames

SAMPLE_RATE = 24000


@dataclass
class CallCost:
    """Seconds of one batched token2wav call (H100 fit; bf16 estimator with CUDA graphs)."""
    graph_rows: list[int]
    graph_frames: list[int]
    gpu_share: float = 1.0      # >1: the flow and HiFT share the GPU with vLLM's decode

    def padded(self, rows: int, frames: int) -> tuple[int, int]:
        return bucket_shape(sorted(self.graph_rows), sorted(self.graph_frames), rows, frames)

    def euler_step(self, rows: int, frames: int, cached: int = 0) -> float:
        """One estimator call on the padded shape: ~3.7 ms fixed, linear in rows x frames, plus the
        attention term in rows x frames^2 (fits flow_profile within ~10% from 2 x 256 to 128 x 1024).
        ``cached``: leading frames whose keys and values come from the voice prefix cache (not
        computed, but attended to)."""
        r, f = self.padded(rows, frames - cached)
        return (3.7 + 1.05e-3 * r * f + 3.1e-7 * r * f * (f + cached)) / 1e3 * self.gpu_share

    def encoder(self, streams: int, tokens: int) -> float:
        return (3.0 + 0.0041 * streams * tokens) / 1e3 * self.gpu_share

    def hift(self, streams: int, new_frames: int) -> float:
        return (4.0 + 0.016 * streams * new_frames) / 1e3 * self.gpu_share


class VirtualTime:
    """The model's clock and its event queue (time, order, callback)."""

    def __init__(self):
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()

    def at(self, t: float, fn) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn))

    def run_until(self, t: float) -> None:
        """Fire every event due by ``t``, in time order; the clock ends at ``t``."""
        while self._events and self._events[0][0] <= t:
            when, _, fn = heapq.heappop(self._events)
            self.now = max(self.now, when)
            fn()
        self.now = max(self.now, t)

    def next_time(self) -> float | None:
        return self._events[0][0] if self._events else None


class ModelRunner:
    """``Token2WavRunner`` that advances the virtual clock by ``CallCost`` instead of computing."""

    def __init__(self, clock: VirtualTime, cost: CallCost, prompt_tokens: int, lookahead: int = 3,
                 prefix_frames: int = 0):
        self.clock, self.cost, self.prompt_tokens, self.lookahead = clock, cost, prompt_tokens, lookahead
        self.prefix_frames = prefix_frames      # the engine's voice prefix cache (non-final calls)

    def cached_frames(self, prompt, plan) -> int:
        return 0 if plan.final else self.prefix_frames

    def padded_cost(self, streams: int, frames: int) -> int:
        rows, padded = self.cost.padded(2 * streams, frames)
        return rows * padded // 2

    def run(self, items, between=None):
        frames = max(flow_cost_frames(self.prompt_tokens, it.plan, self.lookahead) - self.cached_frames(None, it.plan)
                     for it in items)
        cached = max(self.cached_frames(None, it.plan) for it in items)          # keys read from the cache
        new = [2 * ((it.plan.token_end if it.plan.final else it.plan.token_end - self.lookahead)
                    - it.plan.token_offset) for it in items]
        self.clock.run_until(self.clock.now + self.cost.encoder(len(items), self.prompt_tokens + max(
            it.plan.token_end for it in items)))
        step = self.cost.euler_step(2 * len(items), frames + cached, cached)
        for k in range(10):
            self.clock.run_until(self.clock.now + step)
            if between is not None and k < 9:
                between()
        self.clock.run_until(self.clock.now + self.cost.hift(len(items), max(new)))
        return [(np.zeros(chunk_samples(it.plan, it.cache is None, self.lookahead), np.float32),
                 None if it.plan.final else True) for it in items]


@dataclass
class Listener:
    """One stream's client: plays audio as it arrives (engine_bench's accounting: a late chunk is an
    underrun only if its segment was released while audio was still playing)."""
    releases: dict = field(default_factory=dict)
    first_audio: dict = field(default_factory=dict)
    playback: PlaybackClock = field(default_factory=PlaybackClock)
    chunks: int = 0
    late_chunks: list = field(default_factory=list)
    done: bool = False

    def deliver(self, now: float, chunk: ChunkOut) -> None:
        self.done = self.done or chunk.final
        if not len(chunk.samples):
            return
        self.first_audio.setdefault(chunk.utterance, now)
        end, before = self.playback.play_end, self.playback.underruns
        self.playback.deliver(now, len(chunk.samples) / SAMPLE_RATE,
                              count_underrun=end is not None and self.releases[chunk.utterance] <= end)
        if self.playback.underruns > before:
            self.late_chunks.append(self.chunks)
        self.chunks += 1


def simulate(cfg: EngineConfig, concurrency: int, cost: CallCost, seed: int = 0, text_chars: int = 300,
             chars_per_s: float = 30.0, tokens_per_char: float = 5 / 3, ramp_s: float = 1.0,
             prompt_tokens: int = 75, llm_first_token_s: float = 0.04, llm_tokens_per_s: float | None = None,
             max_batch: int | None = None) -> dict:
    """One engine_bench run in the model; returns engine_bench's headline numbers."""
    clock = VirtualTime()
    rate = llm_tokens_per_s or (300.0 if concurrency < 4 else 100.0)   # vLLM: unpaced / paced at 100 steps/s
    prefix = min(voice_prefix_frames(prompt_tokens), cfg.prefix_cache_frames) if cfg.prefix_cache_voices > 0 else 0
    sch = Scheduler(ModelRunner(clock, cost, prompt_tokens, cfg.lookahead_tokens, prefix),
                    SchedulerConfig(cfg.flow_frame_budget, max_batch or cfg.max_batch, cfg.urgent_frame_budget,
                                    cfg.preempt_first_chunks), clock=lambda: clock.now)
    prompt = FlowPrompt(torch.zeros(prompt_tokens, dtype=torch.long), torch.zeros(2 * prompt_tokens, 80),
                        torch.zeros(192))
    rng = random.Random(seed * 1000 + concurrency)          # engine_bench's texts and start times
    texts = [chatbot_text(text_chars, rng) for _ in range(concurrency)]
    starts = [rng.uniform(0, ramp_s) for _ in range(concurrency)]
    listeners = [Listener() for _ in range(concurrency)]

    def start_stream(i: int) -> None:
        sid, seg, lis = f"s{i}", StreamingSegmenter(), listeners[i]
        sch.open(StreamSpec(sid, prompt, lambda c: lis.deliver(clock.now, c), cfg.policy()))
        count = itertools.count()

        def release(text: str) -> None:
            k, n = next(count), max(1, math.ceil(len(text) * tokens_per_char))
            lis.releases[k] = clock.now
            sch.begin_utterance(sid, k, k)
            t0 = clock.now + llm_first_token_s
            per_event = max(1, round(rate / 100))
            for j in range(0, n, per_event):
                m = min(per_event, n - j)
                clock.at(t0 + (j + m - 1) / rate, lambda m=m: sch.add_tokens(sid, k, [1] * m))
            clock.at(t0 + (n - 1) / rate, lambda: sch.end_utterance(sid, k))

        t = clock.now
        for frag in fragments(texts[i]):
            clock.at(t, lambda frag=frag: [release(s) for s in seg.feed(frag, now=clock.now)])
            t += len(frag) / chars_per_s
        for tick in np.arange(clock.now, t, 0.05):            # the engine polls the segmenter's delays
            clock.at(float(tick), lambda: [release(s) for s in seg.poll(now=clock.now)])
        clock.at(t, lambda: ([release(s) for s in seg.end(now=clock.now)], sch.end_stream(sid)))

    for i, s in enumerate(starts):
        clock.at(s, lambda i=i: start_stream(i))
    while not all(lis.done for lis in listeners):
        if sch.step_once():
            clock.run_until(clock.now)                       # what arrived during the call
            continue
        nxt = clock.next_time()
        if nxt is None:
            break
        clock.run_until(nxt)
    wall = clock.now
    ttfa = [lis.first_audio[0] - lis.releases[0] for lis in listeners if 0 in lis.first_audio]
    late = [k for lis in listeners for k in lis.late_chunks]
    steps = list(sch.steps)
    return {
        "c": concurrency, "ttfa_p50_ms": 1e3 * float(np.percentile(ttfa, 50)),
        "ttfa_p95_ms": 1e3 * float(np.percentile(ttfa, 95)),
        "underruns": len(late), "streams_with_underruns": sum(bool(lis.late_chunks) for lis in listeners),
        "late_chunk_index": dict(sorted(collections.Counter(min(k, 5) for k in late).items())),
        "audio_s_per_wall_s": sum(lis.playback.audio_s for lis in listeners) / wall,
        "mean_batch": float(np.mean([s.batch for s in steps])) if steps else 0.0,
        "flow_frames_per_new_frame": sum(s.frames for s in steps) / max(1, sum(s.new_frames for s in steps)),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16,64,128")
    ap.add_argument("--config", default=None, help="engine config YAML (default: the dataclass defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="engine config override")
    ap.add_argument("--gpu-share", type=float, default=1.0, help="flow/HiFT slowdown from sharing the GPU")
    ap.add_argument("--llm-tokens-per-s", type=float, default=None, help="per request (default 300 below 4 "
                    "streams, else 100: vLLM paced)")
    ap.add_argument("--ramp-s", type=float, default=1.0)
    ap.add_argument("--no-batching", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    cfg = EngineConfig.load(args.config, **overrides)
    cost = CallCost(cfg.graph_rows, cfg.graph_frames, args.gpu_share)
    print("| c | TTFA release p50/p95 ms | underruns (streams) | late chunk's index: count | audio s / wall s "
          "| mean batch | flow frames per new frame |")
    print("|---|---|---|---|---|---|---|")
    for c in [int(x) for x in args.concurrency.split(",")]:
        r = simulate(cfg, c, cost, args.seed, ramp_s=args.ramp_s, llm_tokens_per_s=args.llm_tokens_per_s,
                     max_batch=1 if args.no_batching else None)
        late = ", ".join(f"{k}: {v}" for k, v in r["late_chunk_index"].items()) or "none"
        print(f"| {c} | {r['ttfa_p50_ms']:.0f}/{r['ttfa_p95_ms']:.0f} | {r['underruns']} "
              f"({r['streams_with_underruns']}) | {late} | {r['audio_s_per_wall_s']:.1f} | {r['mean_batch']:.1f} "
              f"| {r['flow_frames_per_new_frame']:.1f} |")


if __name__ == "__main__":
    main()
