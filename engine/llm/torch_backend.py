"""``TorchLLMBackend``: the LLM stage in plain PyTorch, all live requests decoded together.

One worker thread owns the model and the KV cache. Each step it

1. applies commands from the event loop (new requests, text for bistream requests, aborts),
2. runs one batched forward over every request with exactly one id to feed (the decode batch) and
   one over requests with several (prefills, bistream text blocks),
3. samples all rows with one batched RAS call and reads the ids back (the step's only host sync),
4. hands new tokens to the requests' asyncio queues (one ``loop.call_soon_threadsafe`` per loop per step).

Live requests occupy KV-cache slots ``0..n-1``; a finished request's slot is refilled by moving the
last one into it, so the decode batch normally reads the cache as a view. Each request draws its
sampling randomness from its own CPU ``torch.Generator`` (seeded by ``LLMRequest.seed``), so its
tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import random
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from engine.llm import ids as uid
from engine.llm.backend import LLMRequest
from engine.llm.bistream import BistreamState, Outcome
from engine.llm.model import CosyVoice2LM
from engine.llm.qwen2 import Batch, KVCache
from engine.llm.sampling import SampleBatch, batched_ras

_UNIFORM_BLOCK = 64   # steps of random numbers drawn per generator call


class BackendClosed(RuntimeError):
    """The backend was closed while the request was running."""


@dataclass
class _Seq:
    key: int
    req: LLMRequest
    loop: asyncio.AbstractEventLoop
    out_q: asyncio.Queue
    gen: torch.Generator
    bistream: BistreamState | None = None
    min_len: int = 0
    max_len: int = 0
    slot: int = -1
    length: int = 0                   # cache positions holding this request's K/V
    feed: list[int] = field(default_factory=list)    # unified ids to feed next
    history: list[int] = field(default_factory=list)  # sampler history (bistream: incl. fills)
    emitted: int = 0
    finished: bool = False
    _uniform: torch.Tensor | None = None
    _u_next: int = 0

    def uniforms(self) -> torch.Tensor:
        """This step's two U[0,1) numbers from the request's own generator."""
        if self._uniform is None or self._u_next >= _UNIFORM_BLOCK:
            self._uniform = torch.rand(_UNIFORM_BLOCK, 2, generator=self.gen)
            self._u_next = 0
        self._u_next += 1
        return self._uniform[self._u_next - 1]


class TorchLLMBackend:
    def __init__(self, model: CosyVoice2LM, device: str | torch.device, dtype: torch.dtype | None = None,
                 max_batch: int = 256):
        """``model`` is moved to ``device``/``dtype`` (None: keep its dtype). At most ``max_batch``
        requests decode at once; more wait in arrival order."""
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.dtype = self.model.llm_decoder.weight.dtype
        self.sampling = model.cfg.sampling
        self.max_batch = max_batch
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._keys = itertools.count()
        self._by_id: dict[str, _Seq] = {}      # request_id -> running request (event-loop side)
        # worker-thread state
        self._live: list[_Seq] = []            # index == slot
        self._waiting: list[_Seq] = []
        self._cache: KVCache | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}

    # -- LLMBackend -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="torch-llm", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None, None))
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def generate(self, request: LLMRequest) -> AsyncIterator[list[int]]:
        seq = self._submit(request, None)
        try:
            async for tokens in self._drain(seq):
                yield tokens
        finally:
            self._release(seq)

    async def generate_bistream(self, request: LLMRequest,
                                text_ids: AsyncIterator[list[int]]) -> AsyncIterator[list[int]]:
        sm = BistreamState(request.prompt_text_ids, request.prompt_speech_tokens,
                           self.model.cfg.mix_ratio, strict=False)
        seq = self._submit(request, sm)
        feeder = asyncio.ensure_future(self._feed_text(seq, text_ids))
        try:
            async for tokens in self._drain(seq):
                yield tokens
        finally:
            feeder.cancel()
            self._release(seq)
        if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
            raise feeder.exception()   # the text source failed; the request was aborted

    async def abort(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is not None:
            self._inbox.put(("abort", seq.key, None))

    def active_requests(self) -> int:
        """Requests the worker still holds (decoding, waiting for text or for a free slot)."""
        return len(self._live) + len(self._waiting)

    # -- event-loop side helpers ------------------------------------------------------------------
    def _submit(self, request: LLMRequest, sm: BistreamState | None) -> _Seq:
        if self._thread is None:
            raise RuntimeError("TorchLLMBackend.start() was not awaited")
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already running")
        seed = request.seed if request.seed is not None else random.SystemRandom().getrandbits(62)
        seq = _Seq(next(self._keys), request, asyncio.get_running_loop(), asyncio.Queue(),
                   torch.Generator().manual_seed(seed), bistream=sm)
        if sm is None:
            seq.min_len, seq.max_len = request.length_bounds()
            seq.feed = uid.prefix_unified_ids(request.prompt_text_ids, request.text_ids,
                                              request.prompt_speech_tokens)
        self._by_id[request.request_id] = seq
        self._inbox.put(("add", seq.key, seq))
        return seq

    async def _drain(self, seq: _Seq) -> AsyncIterator[list[int]]:
        while True:
            item = await seq.out_q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _release(self, seq: _Seq) -> None:
        """The consumer is gone: forget the id and stop the request if it still runs."""
        if self._by_id.get(seq.req.request_id) is seq:
            del self._by_id[seq.req.request_id]
        if self._thread is not None:
            self._inbox.put(("abort", seq.key, None))

    async def _feed_text(self, seq: _Seq, text_ids: AsyncIterator[list[int]]) -> None:
        """Forward text ids to the worker; a failing text source aborts the request."""
        try:
            async for ids in text_ids:
                if ids:
                    self._inbox.put(("text", seq.key, list(ids)))
        except Exception:
            self._inbox.put(("abort", seq.key, None))
            raise
        self._inbox.put(("end", seq.key, None))

    # -- worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._apply_commands(block=not self._runnable()):
                    break
                rows = self._runnable()
                if rows:
                    try:
                        self._step(rows)
                    except Exception as exc:  # a failed forward ends its requests, not the worker
                        for s in rows:
                            self._finish(s, exc)
                self._flush()
        for s in self._live + self._waiting:
            s.finished = True
            self._post(s, BackendClosed("LLM backend closed"))
        self._flush()
        self._live, self._waiting, self._cache = [], [], None

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``); False once asked to stop."""
        first = True
        while True:
            try:
                cmd, key, arg = self._inbox.get(block=block and first)
            except queue.Empty:
                return True
            first = False
            if cmd == "stop":
                return False
            if cmd == "add":
                if arg.bistream is None and arg.max_len <= 0:
                    arg.finished = True
                    self._post(arg, None)
                else:
                    self._waiting.append(arg)
                continue
            seq = self._find(key)
            if seq is None:
                continue
            if cmd == "abort":
                self._finish(seq, None)
            elif cmd == "text" and not seq.bistream.text_ended:
                seq.bistream.push_text(arg)
            elif cmd == "end":
                seq.bistream.end_text()

    def _post(self, seq: _Seq, item) -> None:
        """Queue tokens (list), None (end) or an exception for ``seq``'s consumer."""
        self._outbox.setdefault(seq.loop, []).append((seq.out_q, item))

    def _flush(self) -> None:
        """Hand the step's output to the event loops: one thread-safe call per loop, not per token."""
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:   # that loop is closed; nobody is listening
                pass
        self._outbox = {}

    def _find(self, key: int) -> _Seq | None:
        for s in itertools.chain(self._live, self._waiting):
            if s.key == key:
                return s
        return None

    def _runnable(self) -> list[_Seq]:
        """Admit waiting requests into free slots; return the live ones with input to feed."""
        while self._waiting and len(self._live) < self.max_batch:
            s = self._waiting.pop(0)
            s.slot = len(self._live)
            self._live.append(s)
        rows = []
        for s in self._live:
            if s.bistream is not None and not s.feed:
                s.feed = s.bistream.next_input() or []
            if s.feed:
                rows.append(s)
        return rows

    def _finish(self, seq: _Seq, error: BaseException | None) -> None:
        """End ``seq``'s iterator and free its slot (the last live request moves into it)."""
        if seq.finished:
            return
        seq.finished = True
        self._post(seq, error)
        if seq in self._waiting:
            self._waiting.remove(seq)
            return
        last = self._live.pop()
        if last is not seq:
            if self._cache is not None:
                self._cache.move(last.slot, seq.slot, last.length)
            last.slot = seq.slot
            self._live[seq.slot] = last

    def _step(self, rows: list[_Seq]) -> None:
        # rows are in slot order, so a decode batch of every live request reads the cache as a view
        singles = [s for s in rows if len(s.feed) == 1]
        multis = [s for s in rows if len(s.feed) > 1]
        sample_in = self._sample_inputs(multis + singles)
        logps = [self._forward(g) for g in (multis, singles) if g]
        logp = torch.cat(logps) if len(logps) > 1 else logps[0]
        chosen = batched_ras(logp, sample_in, self.sampling).tolist()
        for s, tok in zip(multis + singles, chosen):
            self._advance(s, tok)

    def _sample_inputs(self, rows: list[_Seq]) -> SampleBatch:
        win = self.sampling.win_size
        hist = torch.full((len(rows), win), -1, dtype=torch.long)
        for i, s in enumerate(rows):
            h = s.history[-win:] if win > 0 else []
            if h:
                hist[i, win - len(h):] = torch.tensor(h)
        ignore = [s.bistream.ignore_eos if s.bistream is not None else s.emitted < s.min_len for s in rows]
        bans = [self._banned_stops(s) for s in rows]
        return SampleBatch(history=self._h2d(hist), ignore_eos=self._h2d(torch.tensor(ignore)),
                           ras=self._h2d(torch.tensor([s.req.ras for s in rows])),
                           uniform=self._h2d(torch.stack([s.uniforms() for s in rows])),
                           ban_stops=self._h2d(torch.tensor(bans)) if any(any(b) for b in bans) else None)

    @staticmethod
    def _banned_stops(s: _Seq) -> tuple[bool, bool, bool]:
        """Stop ids (6561, 6562, 6563) a row may not draw: an explicit ``min_tokens`` forbids every
        stop before it is reached (like vLLM's min_tokens); in bistream's text phase the fill token
        stays allowed, since it only pauses decoding until more text arrives."""
        if s.req.min_tokens is None or s.emitted >= s.req.min_tokens:
            return (False, False, False)
        text_phase = s.bistream is not None and not s.bistream.final_phase
        return (True, True, not text_phase)

    def _h2d(self, t: torch.Tensor) -> torch.Tensor:
        # non_blocking: a blocking copy would wait for the forward already queued on the stream
        return t.to(self.device, non_blocking=True)

    def _forward(self, rows: list[_Seq]) -> torch.Tensor:
        """One batched forward feeding each row its ``feed`` ids -> logp [B, 6564] at the last one."""
        T = max(len(s.feed) for s in rows)
        kv_len = max(s.length for s in rows) + T
        self._ensure_cache(kv_len)
        ids = torch.tensor([s.feed + [0] * (T - len(s.feed)) for s in rows], dtype=torch.long)
        starts = torch.tensor([s.length for s in rows], dtype=torch.long)
        slots = [s.slot for s in rows]
        batch = Batch(slots=self._h2d(torch.tensor(slots)), positions=self._h2d(starts[:, None] + torch.arange(T)),
                      kv_len=kv_len, contiguous=slots == list(range(len(rows))))
        last = self._h2d(torch.tensor([len(s.feed) - 1 for s in rows]))
        _, logp = self.model(self._h2d(ids), self._cache, batch, last)
        for s in rows:
            s.length += len(s.feed)
            s.feed = []
        return logp

    def _ensure_cache(self, kv_len: int) -> None:
        need_slots = len(self._live)
        c = self._cache
        if c is None:
            self._cache = self.model.new_cache(max(need_slots, 4), _round_up(max(kv_len, 256), 256),
                                               self.device, self.dtype)
        elif need_slots > c.slots or kv_len > c.capacity:
            slots = min(self.max_batch, max(need_slots, 2 * c.slots)) if need_slots > c.slots else c.slots
            cap = _round_up(max(kv_len, 2 * c.capacity), 256) if kv_len > c.capacity else c.capacity
            self._cache = c.grow(slots, cap)

    def _advance(self, s: _Seq, tok: int) -> None:
        """Apply the sampled id to a request: deliver, stop, or (bistream) wait for text."""
        if s.finished:
            return
        if s.bistream is None:
            if tok in uid.STOP_IDS:
                self._finish(s, None)
                return
            s.history.append(tok)
            s.emitted += 1
            self._post(s, [tok])
            s.feed = [tok]
            if s.emitted >= s.max_len:
                self._finish(s, None)
            return
        sm = s.bistream
        if sm.fill_due():
            tok = uid.FILL
        outcome = sm.accept(tok)
        s.history = sm.out_tokens
        if outcome is Outcome.STOP:
            self._finish(s, None)
        elif outcome is Outcome.EMIT:
            s.emitted += 1
            self._post(s, [tok])
            bound = s.req.max_tokens if s.req.max_tokens is not None else 20 * max(1, sm.text_consumed)
            if s.emitted >= bound:
                self._finish(s, None)


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
