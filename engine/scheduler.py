"""The flow + HiFT worker: one thread that batches the token2wav calls of all live streams.

Each step the worker (1) applies the commands queued by the event loop (open, tokens, end, cancel),
(2) asks every stream whether its head utterance has enough tokens for a call (``policy.plan_chunk``:
first chunk 15 + 3 lookahead tokens, later chunks growing with the playback slack, the final chunk at
end of tokens), (3) orders the candidates by deadline (first audio first, then least slack) and packs
as many as fit the frame budget, (4) runs them as ONE batched flow call and ONE batched HiFT call
(``Token2WavRunner``) and (5) hands each stream its samples through the stream's ``sink`` callback
(called on the worker thread; the engine forwards it to the event loop with ``call_soon_threadsafe``).
A call without first chunks can be preempted: between its Euler steps the worker runs the first
chunks that became ready meanwhile as their own short call (``SchedulerConfig.preempt``), so a new
stream waits for one Euler step instead of a whole step.

All per-stream state (voice prompt tensors, tokens, offsets, HiFT cache, noise generator, playback
clock) is owned by this thread; other threads only enqueue commands. A cancelled stream's state is
dropped at the start of the next step, so at most the step in flight still computes for it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from engine.streaming.policy import (Candidate, ChunkPlan, ChunkPolicy, PlaybackClock, deadline_key,
                                     flow_cost_frames, pack, plan_chunk, row_padded_cost)

log = logging.getLogger(__name__)
SAMPLE_RATE = 24000


@dataclass
class FlowPrompt:
    """A voice as the flow needs it: prompt tokens [P] (int64), prompt mel [2P, 80], x-vector [192]."""
    tokens: torch.Tensor
    feat: torch.Tensor
    embedding: torch.Tensor

    def __post_init__(self):
        if self.feat.shape[0] != 2 * self.tokens.shape[0]:
            raise ValueError(f"prompt feat has {self.feat.shape[0]} frames for {self.tokens.shape[0]} tokens")

    @functools.cached_property
    def key(self) -> bytes:
        """A hash of the contents: streams of the same voice share its flow prefix cache."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.tokens.to(torch.long), self.feat.to(torch.float32), self.embedding.to(torch.float32)):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()


@dataclass
class ChunkOut:
    """One chunk of audio for a stream: float32 24 kHz samples of utterance ``utterance``."""
    stream_id: str
    utterance: int
    tag: Any                  # what the engine attached to the utterance (its segment)
    samples: np.ndarray
    final_of_utterance: bool
    final: bool               # last chunk of the stream
    slack_s: float | None     # playback slack (scheduler's model) when the chunk was delivered
    token_end: int = 0        # tokens of the utterance voiced up to the end of this chunk


@dataclass
class CallItem:
    """One stream's part of a batched token2wav call (see ``Token2WavRunner.run``)."""
    prompt: FlowPrompt
    tokens: torch.Tensor       # int64 [token_end]
    plan: ChunkPlan
    cache: Any                 # the utterance's HiftCache or None (first call)
    generator: torch.Generator
    speed: float = 1.0


class Token2WavRunner(Protocol):
    def run(self, items: list[CallItem], between: Callable[[], None] | None = None
            ) -> list[tuple[np.ndarray, Any]]:
        """Run the calls of ``items`` together; per item (float32 samples at 24 kHz, new HiFT cache).
        ``between`` (passed only when set) is called now and then during the call, e.g. between
        Euler steps; it may call ``run`` again on the same thread."""
        ...

    # Optional: ``padded_cost(streams, frames) -> int``, the stream-frames a call of ``streams`` rows
    # of at most ``frames`` frames really computes (CUDA-graph buckets; default streams × frames),
    # ``cached_frames(prompt, plan) -> int``, leading frames of a call that the runner does not compute
    # (default 0), and ``last_phases: dict[str, float]``, seconds per phase of the last run (kept in
    # StepRecord).


@dataclass
class StreamSpec:
    """What the scheduler needs to know about a new stream."""
    stream_id: str
    prompt: FlowPrompt
    sink: Callable[[ChunkOut | None], None]   # called on the worker thread; None = the stream failed
    policy: ChunkPolicy = field(default_factory=ChunkPolicy)
    speed: float = 1.0
    seed: int | None = None
    # Test hook: reseed the HiFT generator with call_seeds[k] before the stream's k-th call (golden
    # cases seed the RNG before every upstream call).
    call_seeds: list[int] | None = None


@dataclass
class _Utterance:
    index: int
    tag: Any
    released_at: float
    tokens: list[int] = field(default_factory=list)
    llm_done: bool = False
    offset: int = 0
    chunks: int = 0
    cache: Any = None


@dataclass
class _Stream:
    spec: StreamSpec
    generator: torch.Generator
    opened_at: float
    clock: PlaybackClock = field(default_factory=PlaybackClock)
    utterances: deque = field(default_factory=deque)
    ended: bool = False
    calls: int = 0
    final_sent: bool = False


@dataclass
class SchedulerConfig:
    frame_budget: int = 8192      # padded mel frames (rows x longest prompt+prefix+new) per flow call
    max_batch: int = 128          # streams per call; 1 = the --no-batching baseline
    urgent_frame_budget: int | None = 2048   # budget of a step led by a first chunk (short step)
    preempt: bool = True          # first chunks may run between the Euler steps of a call in flight
    idle_poll_s: float = 0.005    # re-plan interval while streams wait for tokens


@dataclass
class StepRecord:
    """What one step did (kept for metrics and tests)."""
    batch: int
    frames: int          # padded flow frames: rows x longest row, as padded to the runner's bucket
    new_frames: int      # mel frames emitted (the rest is prompt/prefix recomputation and padding)
    seconds: float
    stream_ids: list[str]
    # runner's seconds per phase (flow, hift); "preempted": first-chunk calls run inside this one
    # (their time is taken out of "flow" and of seconds)
    phases: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # scheduler clock when the call began


class Scheduler:
    """The worker thread. All public methods are thread-safe and return at once."""

    def __init__(self, runner: Token2WavRunner, config: SchedulerConfig | None = None,
                 device: str | torch.device = "cpu", clock: Callable[[], float] = time.monotonic,
                 hold_llm: Callable[[bool], None] | None = None):
        """``hold_llm(True)`` is called before a call that makes a stream's first audio and
        ``hold_llm(False)`` after it (the vLLM backend then holds decode steps that can wait)."""
        self.runner = runner
        self.hold_llm = hold_llm
        self.config = config or SchedulerConfig()
        self.device = torch.device(device)
        self.clock = clock
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}       # worker-owned
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps: deque[StepRecord] = deque(maxlen=20000)   # the most recent steps
        self.step_count = 0                                     # all steps so far
        self.live_streams = 0
        self.error: BaseException | None = None
        self._padded_cost = getattr(runner, "padded_cost", row_padded_cost)
        self._cached_frames = getattr(runner, "cached_frames", lambda prompt, plan: 0)

    # ---- commands (any thread) ----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="token2wav-scheduler", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def open(self, spec: StreamSpec) -> None:
        self._post(("open", spec, self.clock()))

    def begin_utterance(self, stream_id: str, index: int, tag: Any = None) -> None:
        """Start utterance ``index`` (utterances of a stream are voiced in the order they begin)."""
        self._post(("begin", stream_id, index, tag, self.clock()))

    def add_tokens(self, stream_id: str, index: int, tokens: list[int]) -> None:
        self._post(("tokens", stream_id, index, list(tokens)))

    def end_utterance(self, stream_id: str, index: int) -> None:
        """No more tokens for utterance ``index`` (the LLM finished it)."""
        self._post(("end_utt", stream_id, index))

    def end_stream(self, stream_id: str) -> None:
        """No more utterances; the stream's last chunk carries ``final=True`` (possibly empty)."""
        self._post(("end", stream_id))

    def cancel(self, stream_id: str) -> None:
        """Drop the stream: no further chunk is delivered after the step in flight."""
        self._post(("cancel", stream_id))

    def step_once(self) -> bool:
        """Run one step on the calling thread (tests, without ``start``); True if a call ran."""
        self._drain()
        return self._step()

    # ---- worker ----
    def _post(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _loop(self) -> None:
        # On CUDA the worker issues its work on its own stream, so the flow/HiFT kernels can overlap
        # with an in-process LLM backend's decode steps instead of queueing behind them.
        stream_ctx = (torch.cuda.stream(torch.cuda.Stream(self.device)) if self.device.type == "cuda"
                      else contextlib.nullcontext())
        try:
            with torch.inference_mode(), stream_ctx:
                while not self._stop:
                    self._wake.clear()
                    self._drain()
                    if self._step():
                        continue
                    waiting = any(s.utterances for s in self._streams.values())
                    self._wake.wait(self.config.idle_poll_s if waiting else 0.5)
        except BaseException as exc:  # a bug in the worker itself: fail every stream
            log.exception("scheduler worker died")
            self.error = exc
            for s in list(self._streams.values()):
                self._safe_sink(s, None)

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            self._apply(cmd)
        self.live_streams = len(self._streams)

    def _apply(self, cmd: tuple) -> None:
        kind, sid = cmd[0], (cmd[1].stream_id if cmd[0] == "open" else cmd[1])
        if kind == "open":
            spec = cmd[1]
            gen = torch.Generator(device=self.device)
            gen.manual_seed(spec.seed if spec.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self._streams[sid] = _Stream(spec=spec, generator=gen, opened_at=cmd[2])
            return
        st = self._streams.get(sid)
        if st is None:
            return  # cancelled or unknown: ignore
        if kind == "begin":
            st.utterances.append(_Utterance(index=cmd[2], tag=cmd[3], released_at=cmd[4]))
        elif kind == "tokens":
            u = self._find(st, cmd[2])
            if u is not None:
                u.tokens.extend(cmd[3])
        elif kind == "end_utt":
            u = self._find(st, cmd[2])
            if u is not None:
                u.llm_done = True
        elif kind == "end":
            st.ended = True
            self._finish_if_done(st)
        elif kind == "cancel":
            del self._streams[sid]

    @staticmethod
    def _find(st: _Stream, index: int) -> _Utterance | None:
        for u in st.utterances:
            if u.index == index:
                return u
        return None

    def _candidates(self, now: float, streams: list[tuple[str, _Stream]] | None = None) -> list[Candidate]:
        """The streams (default: all) whose head utterance can make a call now, with their plans."""
        out = []
        for sid, st in (list(self._streams.items()) if streams is None else streams):
            self._drop_empty_heads(st)
            if not st.utterances:
                self._finish_if_done(st)
                continue
            u = st.utterances[0]
            pol = st.spec.policy
            slack = st.clock.slack(now)
            hop = pol.hop(u.chunks, slack, len(u.tokens) - u.offset, u.llm_done)
            plan = plan_chunk(len(u.tokens), u.offset, u.llm_done, hop, pol.lookahead)
            if plan is None:
                continue
            silent = st.clock.play_end is None
            key = deadline_key(not silent, slack, u.released_at)
            cost = (flow_cost_frames(int(st.spec.prompt.tokens.shape[0]), plan, pol.lookahead)
                    - self._cached_frames(st.spec.prompt, plan))
            out.append(Candidate(key, cost, sid, plan, first_audio=silent))
        return out

    def _drop_empty_heads(self, st: _Stream) -> None:
        while st.utterances and st.utterances[0].llm_done and not st.utterances[0].tokens:
            st.utterances.popleft()   # a segment the LLM gave no tokens: nothing to voice

    def _step(self) -> bool:
        chosen = self._pack(self._candidates(self.clock()))
        if not chosen:
            return False
        # A step without first chunks lets the first chunks that become ready meanwhile run between
        # its Euler steps, instead of waiting for the whole step.
        self._run(chosen, preemptible=self.config.preempt and not chosen[0].first_audio)
        return True

    def _pack(self, candidates: list[Candidate]) -> list[Candidate]:
        return pack(candidates, self.config.frame_budget, self.config.max_batch,
                    self.config.urgent_frame_budget, self._padded_cost)

    def _first_chunks_between(self, busy: set[str]) -> float:
        """Run the first chunks that are ready now (streams not in the call in flight) as their own
        call; returns the seconds it took."""
        self._drain()
        silent = [(sid, st) for sid, st in self._streams.items() if st.clock.play_end is None and sid not in busy]
        urgent = self._candidates(self.clock(), silent) if silent else []
        if not urgent:
            return 0.0
        t0 = time.perf_counter()
        self._run(self._pack(urgent), preemptible=False)
        return time.perf_counter() - t0

    def _run(self, chosen: list[Candidate], preemptible: bool) -> None:
        """One batched token2wav call for ``chosen``, then delivery of each stream's chunk."""
        items, new_frames = [], 0
        for c in chosen:
            st = self._streams[c.stream_id]
            u = st.utterances[0]
            voiced_end = c.plan.token_end if c.plan.final else c.plan.token_end - st.spec.policy.lookahead
            new_frames += 2 * (voiced_end - c.plan.token_offset)
            if st.spec.call_seeds is not None:
                st.generator.manual_seed(st.spec.call_seeds[min(st.calls, len(st.spec.call_seeds) - 1)])
            items.append(CallItem(prompt=st.spec.prompt,
                                  tokens=torch.tensor(u.tokens[:c.plan.token_end], dtype=torch.long),
                                  plan=c.plan, cache=u.cache, generator=st.generator, speed=st.spec.speed))
        preempted = 0.0      # seconds of first-chunk calls run inside this one (own StepRecords)
        busy = {c.stream_id for c in chosen}

        def between() -> None:
            nonlocal preempted
            preempted += self._first_chunks_between(busy)

        hold = self.hold_llm is not None and any(c.first_audio for c in chosen)
        started, t0 = self.clock(), time.perf_counter()
        try:
            if hold:
                self.hold_llm(True)
            results = self.runner.run(items, between) if preemptible else self.runner.run(items)
        except Exception as exc:  # e.g. out of memory: fail this batch's streams, keep serving others
            log.exception("token2wav call for %d streams failed", len(items))
            self.error = exc
            for c in chosen:
                st = self._streams.pop(c.stream_id, None)
                if st is not None:
                    self._safe_sink(st, None)
            self.live_streams = len(self._streams)
            return
        finally:
            if hold:
                self.hold_llm(False)
        self.step_count += 1
        phases = dict(getattr(self.runner, "last_phases", {}))
        if preempted:   # the preempting calls ran inside the flow phase
            if "flow" in phases:
                phases["flow"] = max(0.0, phases["flow"] - preempted)
            phases["preempted"] = preempted
        self.steps.append(StepRecord(len(items), self._padded_cost(len(items), max(c.cost_frames for c in chosen)),
                                     new_frames, time.perf_counter() - t0 - preempted,
                                     [c.stream_id for c in chosen], phases, started))
        self._drain()  # a cancel that arrived during the call drops the stream before delivery
        done = self.clock()
        for c, (samples, cache) in zip(chosen, results):
            st = self._streams.get(c.stream_id)
            if st is None:
                continue
            u = st.utterances[0]
            u.cache, u.chunks, st.calls = cache, u.chunks + 1, st.calls + 1
            lookahead = st.spec.policy.lookahead
            u.offset = c.plan.token_end if c.plan.final else c.plan.token_end - lookahead
            if c.plan.final:
                st.utterances.popleft()
                self._drop_empty_heads(st)
            final = c.plan.final and st.ended and not st.utterances
            # an underrun counts only if the segment was released while audio was still playing
            late_text = st.clock.play_end is not None and u.released_at > st.clock.play_end
            slack = st.clock.deliver(done, len(samples) / SAMPLE_RATE, count_underrun=not late_text)
            st.final_sent = st.final_sent or final
            self._safe_sink(st, ChunkOut(c.stream_id, u.index, u.tag, samples, c.plan.final, final, slack,
                                          u.offset))
            if final:
                del self._streams[c.stream_id]
        self.live_streams = len(self._streams)

    def _finish_if_done(self, st: _Stream) -> None:
        """An ended stream with nothing left to voice gets an empty final chunk."""
        if st.ended and not st.utterances and not st.final_sent:
            st.final_sent = True
            self._safe_sink(st, ChunkOut(st.spec.stream_id, -1, None, np.zeros(0, np.float32),
                                         True, True, st.clock.slack(self.clock())))
            self._streams.pop(st.spec.stream_id, None)

    def _safe_sink(self, st: _Stream, chunk: ChunkOut | None) -> None:
        try:
            st.spec.sink(chunk)
        except Exception:
            log.exception("sink of stream %s failed", st.spec.stream_id)

    def stream_stats(self) -> dict[str, float]:
        """Aggregate numbers for ``Engine.metrics`` (read racily from other threads; approximate)."""
        recent = list(self.steps)[-100:]
        return {
            "scheduler_live_streams": float(self.live_streams),
            "scheduler_pending_commands": float(self._commands.qsize()),
            "scheduler_mean_batch": float(np.mean([r.batch for r in recent])) if recent else 0.0,
            "scheduler_mean_step_s": float(np.mean([r.seconds for r in recent])) if recent else 0.0,
        }
