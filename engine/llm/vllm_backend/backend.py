"""``VLLMBackend``: the LLM stage on vLLM 0.26 ``AsyncLLM`` (implements ``engine.llm.backend.LLMBackend``).

Requests are unified-id token prompts with DELTA outputs; vLLM's engine core runs in its own process
(spawned), so nothing here blocks the event loop. Bistream runs as a vLLM streaming-input session
(one request whose chunks come from ``BistreamPlanner``) or, as a fallback, as one request per chunk
resubmitted with the whole fed prefix (prefix caching makes the re-prefill cheap). ``abort`` and a
consumer that stops iterating both abort the vLLM request, so a disconnect leaves nothing running.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from engine.checkpoint import ModelDir
from engine.config import LLMConfig
from engine.llm import ids as uid
from engine.llm.backend import LLMRequest
from engine.llm.vllm_backend import hf_config, pacing
from engine.llm.vllm_backend.bistream_plan import BistreamPlanner, Chunk
from engine.llm.vllm_backend.logits_math import RowParams
from engine.llm.vllm_backend.sampling import base_kwargs, make_sampling_params, request_kwargs, sampler_kwargs

log = logging.getLogger(__name__)


@dataclass
class VLLMOptions:
    """Engine settings. Start vLLM before flow/HiFT allocate: it checks that
    ``gpu_memory_utilization`` of the whole card is free when it starts."""
    gpu_memory_utilization: float = 0.30
    max_num_seqs: int = 256
    max_model_len: int = 4096
    max_num_batched_tokens: int | None = None
    dtype: str = "bfloat16"
    fp32_head: bool = True                # llm_decoder logits accumulated in float32
    enforce_eager: bool = False           # no torch.compile / CUDA graphs (fast start, tests)
    cudagraph_capture_sizes: list[int] | None = None
    logits_processor: bool = True         # RAS + bistream forcing; False keeps Model Runner V2
    # Decode pacing (pacing.py, needs the logits processor): while pace_busy_rows or more requests
    # decode, at most this many steps a second (4x real-time speech), leaving the GPU to flow/HiFT.
    pace_tokens_per_s: float | None = 100.0
    pace_busy_rows: int = 4
    # Fewer requests than pace_busy_rows hold their decode steps while the flow worker computes a
    # stream's first audio (``hold_decode``; pacing.py), so that call has the GPU alone.
    hold_for_first_audio: bool = True
    # "session" (vLLM streaming input) needs engine_kwargs={"async_scheduling": False} (docs/VLLM.md);
    # "resubmit" works with vLLM's defaults.
    bistream_transport: Literal["session", "resubmit"] = "resubmit"
    bistream_max_tokens: int = 2000       # safety bound per bistream chunk when the request has none
    greedy: bool = False                  # tests only: argmax decoding
    seed: int = 0
    warmup_requests: int = 16             # concurrent requests before ready (Triton top-k JIT)
    config_cache_dir: str | None = None   # where the HF side directory goes (hf_config.side_dir)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)   # passed to AsyncEngineArgs as is


def engine_kwargs(model_dir: str | Path, opts: VLLMOptions, cfg: LLMConfig, hold_path: str | None = None) -> dict:
    """AsyncEngineArgs keyword arguments (no vLLM import; creates the side directory).
    ``hold_path``: the ``pacing.DecodeHold`` file the engine core's pacer watches."""
    overrides = hf_config.hf_overrides(cfg)
    if opts.fp32_head and opts.dtype != "float32":
        overrides["head_dtype"] = "float32"
    kw: dict[str, Any] = dict(
        model=str(hf_config.side_dir(model_dir, opts.config_cache_dir, opts.dtype)),
        skip_tokenizer_init=True, generation_config="vllm", hf_overrides=overrides,
        load_format="pt", dtype=opts.dtype, seed=opts.seed,
        gpu_memory_utilization=opts.gpu_memory_utilization, max_num_seqs=opts.max_num_seqs,
        max_model_len=opts.max_model_len, enforce_eager=opts.enforce_eager,
        enable_prefix_caching=True, disable_log_stats=True,
    )
    if opts.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = opts.max_num_batched_tokens
    if opts.cudagraph_capture_sizes:
        kw["cudagraph_capture_sizes"] = list(opts.cudagraph_capture_sizes)
    if opts.logits_processor:
        kw["logits_processors"] = [hf_config.PROCESSOR]
        if opts.pace_tokens_per_s or hold_path:
            pace = {"tokens_per_s": opts.pace_tokens_per_s, "busy_rows": opts.pace_busy_rows}
            kw["additional_config"] = {pacing.CONFIG_KEY: pace | ({"hold_path": hold_path} if hold_path else {})}
    kw.update(opts.engine_kwargs)
    return kw


class VLLMBackend:
    def __init__(self, model_dir: str | Path, options: VLLMOptions | None = None):
        self.model_dir = Path(model_dir)
        self.opts = options or VLLMOptions()
        self.cfg = ModelDir(self.model_dir).config().llm
        self.engine = None
        self.startup: dict[str, float] = {}
        self._live: dict[str, str] = {}          # our request id -> current vLLM request id
        self._aborted: set[str] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._hold: pacing.DecodeHold | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the vLLM engine core and warm it up; returns once the first user would not pay
        any compilation."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from engine.llm.vllm_backend.plugin import register
        register()
        # The engine core must be spawned: a server has CUDA initialised (flow/HiFT) and a forked
        # child cannot use it. The plugin entry point re-registers the model in the spawned process.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        t0 = time.perf_counter()
        if self.opts.hold_for_first_audio and self.opts.logits_processor:
            self._hold = pacing.DecodeHold.create()
        try:
            args = AsyncEngineArgs(**engine_kwargs(self.model_dir, self.opts, self.cfg,
                                                   self._hold.path if self._hold else None))
            self.engine = AsyncLLM.from_engine_args(args)
        except BaseException:
            await self.close()         # removes the hold file
            raise
        t1 = time.perf_counter()
        await self.warmup()
        self.startup = {"engine_s": t1 - t0, "warmup_s": time.perf_counter() - t1}
        log.info("vLLM backend ready: %s", self.startup)

    async def warmup(self) -> None:
        """Concurrent short requests (RAS and plain top-k): the first batch with several running
        requests JIT-compiles vLLM's Triton top-k/top-p kernel (~9 s on an H100)."""
        n = max(1, self.opts.warmup_requests)
        rng = random.Random(0)

        async def one(i: int) -> None:
            req = LLMRequest(f"warmup-{i}", [rng.randrange(1000) for _ in range(8)], min_tokens=4,
                             max_tokens=16, seed=i, ras=bool(i % 2))
            async for _ in self.generate(req):
                pass
        for _ in range(2):
            await asyncio.gather(*(one(i) for i in range(n)))

    def hold_decode(self, on: bool) -> None:
        """Raise (True) or drop the flag that holds decode steps of few requests (any thread)."""
        if self._hold is not None:
            self._hold.set(on)

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self._hold is not None:
            self._hold.close(remove=True)
            self._hold = None

    # -- plain requests -------------------------------------------------------------------------
    def request_kwargs(self, request: LLMRequest, prompt_len: int) -> dict:
        lo, hi = request.length_bounds()
        return request_kwargs(prompt_len=prompt_len, min_len=lo, max_len=hi,
                              max_model_len=self.opts.max_model_len, seed=request.seed, ras=request.ras,
                              processor=self.opts.logits_processor, greedy=self.opts.greedy,
                              cfg=self.cfg.sampling, all_stops=request.min_tokens is not None)

    async def generate(self, request: LLMRequest) -> AsyncIterator[list[int]]:
        """Speech tokens (ids < 6561) of ``request`` as vLLM decodes them."""
        prompt = uid.prefix_unified_ids(request.prompt_text_ids, request.text_ids, request.prompt_speech_tokens)
        kwargs = self.request_kwargs(request, len(prompt))
        try:
            async with aclosing(self.generate_raw(request.request_id, prompt, kwargs)) as outs:
                async for out in outs:
                    toks = [t for t in out.outputs[0].token_ids if t < uid.EOS]
                    if toks:
                        yield toks
        finally:
            self._aborted.discard(request.request_id)

    async def generate_raw(self, request_id: str, prompt_ids: list[int], kwargs: dict,
                           vllm_id: str | None = None) -> AsyncIterator[Any]:
        """vLLM RequestOutputs (DELTA) of one token-prompt request; aborts it if the consumer leaves
        early. ``kwargs`` are SamplingParams keyword arguments (tests add ``logprobs``)."""
        from vllm.inputs import TokensPrompt
        vid = vllm_id or request_id
        self._live[request_id] = vid
        finished = False
        try:
            if request_id in self._aborted:
                return
            gen = self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)),
                                       make_sampling_params(kwargs), vid)
            async with aclosing(gen):
                async for out in gen:
                    finished = out.finished
                    yield out
                    if finished or request_id in self._aborted:
                        break
        finally:
            if not finished:
                await self._abort_vllm(vid)
            if self._live.get(request_id) == vid:
                del self._live[request_id]

    # -- bistream -------------------------------------------------------------------------------
    async def generate_bistream(self, request: LLMRequest,
                                text_ids: AsyncIterator[list[int]]) -> AsyncIterator[list[int]]:
        """Speech tokens while ``text_ids`` streams in (cosyvoice2.md §2.8; ``request.text_ids`` unused)."""
        rid = request.request_id
        planner = BistreamPlanner(request.prompt_text_ids, request.prompt_speech_tokens,
                                  tuple(self.cfg.mix_ratio))
        wake = self._wake[rid] = asyncio.Event()
        failure: list[BaseException] = []

        async def pump() -> None:
            try:
                async for ids in text_ids:
                    planner.add_text(list(ids))
                    wake.set()
            except Exception as exc:  # surfaced to the consumer below
                failure.append(exc)
            planner.end_text()
            wake.set()

        pump_task = asyncio.create_task(pump())
        use_session = self.opts.bistream_transport == "session" and self.opts.logits_processor
        run = (self._session_chunks if use_session else self._resubmit_chunks)(request, planner, wake, failure)
        emitted = 0
        try:
            async for toks in run:
                # Total bound as the torch backend: max_tokens, else 20 per consumed text id.
                bound = request.max_tokens if request.max_tokens is not None else 20 * max(1, planner.text_pulled)
                toks = toks[:max(0, bound - emitted)]
                emitted += len(toks)
                if toks:
                    yield toks
                if emitted >= bound:
                    break
        finally:
            await run.aclose()              # aborts the vLLM request if it still runs
            pump_task.cancel()
            self._wake.pop(rid, None)
            self._aborted.discard(rid)

    async def _next_chunk(self, rid: str, planner: BistreamPlanner, wake: asyncio.Event,
                          failure: list[BaseException]) -> Chunk | None:
        while True:
            if failure:
                raise failure[0]
            if rid in self._aborted or planner.done:
                return None
            wake.clear()
            chunk = planner.next_chunk()
            if chunk is not None:
                return chunk
            if planner.text_ended and not planner.incoming:
                return None
            await wake.wait()

    def _chunk_kwargs(self, request: LLMRequest, chunk: Chunk, max_tokens: int, processor: bool,
                      emitted: int) -> dict:
        kw = base_kwargs(request.seed, max_tokens, chunk.stop_ids)
        row = RowParams(mask_ids=list(chunk.mask_ids), force_fill_at=chunk.force_fill_at if processor else None,
                        history=list(chunk.history))
        # An explicit min_tokens bans every stop id until that many speech tokens were emitted; while
        # text streams the fill stays allowed, so only the final chunk is affected.
        min_left = max(0, request.min_tokens - emitted) if (request.min_tokens and chunk.final) else 0
        kw.update(sampler_kwargs(row, ras=request.ras, processor=processor, greedy=self.opts.greedy,
                                 cfg=self.cfg.sampling, min_tokens=min(min_left, max_tokens),
                                 all_stops=True))
        return kw

    def _safety(self, request: LLMRequest) -> int:
        """max_tokens of every bistream chunk: a session keeps its first chunk's value for all chunks,
        so it must cover a streaming chunk (15 speech ids + fill) as well as the final phase."""
        want = max(request.max_tokens or self.opts.bistream_max_tokens, self.cfg.mix_ratio[1] + 1)
        return min(want, self.opts.max_model_len - 1)

    def _schedules_ahead(self) -> bool:
        """Whether vLLM schedules every running request one step ahead (async scheduling: on by
        default on GPU, forced off on CPU)."""
        cfg = getattr(self.engine, "vllm_config", None)
        return bool(cfg is not None and cfg.scheduler_config.async_scheduling)

    async def _session_chunks(self, request, planner, wake, failure) -> AsyncIterator[list[int]]:
        """One vLLM streaming-input session; each chunk is queued only after the previous one
        stopped (its outputs decide the next chunk). Fill forcing is done by the logits processor
        because a session's max_tokens is fixed by its first chunk.

        Needs an engine without async scheduling (``engine_kwargs={"async_scheduling": False}``);
        raises RuntimeError otherwise. A chunk ends at its first stop id (or a length cut); vLLM
        then drops that last sampled id from the session, so the fill is never fed."""
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt
        if self._schedules_ahead():
            # vLLM 0.26 has already scheduled the step after a chunk's stop: the stop id enters the
            # KV cache (the fill would be fed) and one stale token arrives after the stop; as a DELTA
            # merged into the stop output it also clears finish_reason (the first-chunk stall).
            raise RuntimeError("bistream_transport='session' needs vLLM without async scheduling "
                               "(VLLMOptions.engine_kwargs={'async_scheduling': False})")
        rid = request.request_id
        queue: asyncio.Queue = asyncio.Queue()

        async def inputs():
            while (item := await queue.get()) is not None:
                # vLLM extends the prompt list in place: always hand over a copy.
                yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(item[0])),
                                     sampling_params=item[1])

        gen = None
        finished = False
        max_tokens = self._safety(request)
        self._live[rid] = rid
        try:
            while (chunk := await self._next_chunk(rid, planner, wake, failure)) is not None:
                sp = make_sampling_params(self._chunk_kwargs(request, chunk, max_tokens, True,
                                                             len(planner.out_tokens) - planner.out_tokens.count(uid.FILL)))
                await queue.put((chunk.ids, sp))
                if gen is None:
                    # vLLM starts the task that reads ``inputs()`` on the first __anext__.
                    gen = self.engine.generate(inputs(), sp, rid)
                log.debug("%s: chunk of %d ids queued (final=%s, force at %s)", rid, len(chunk.ids),
                          chunk.final, chunk.force_fill_at)
                sampled: list[int] = []
                stop = set(chunk.stop_ids)
                while True:
                    out = await gen.__anext__()
                    o = out.outputs[0]
                    new = list(o.token_ids)
                    end = next((i + 1 for i, t in enumerate(new) if t in stop), None)
                    if end is not None and end < len(new):
                        raise RuntimeError(f"vLLM sampled {new[end:]} after the chunk's stop id")
                    sampled += new
                    toks = [t for t in new if t < uid.EOS]
                    if toks:
                        yield toks
                    if out.finished:
                        finished = True
                        if rid in self._aborted or o.finish_reason == "abort":
                            return
                    if end is not None or o.finish_reason is not None or out.finished:
                        break
                log.debug("%s: chunk done, %d ids sampled, last %s", rid, len(sampled), sampled[-1:])
                if not chunk.final and (not sampled or sampled[-1] != uid.FILL):
                    raise RuntimeError(f"bistream chunk hit the max_tokens bound ({max_tokens})")
                planner.finish_chunk(sampled)
            # After the final chunk the session idles in WAITING_FOR_STREAMING_REQ holding its slot;
            # aborting it (not just closing the input stream) frees it deterministically.
        finally:
            if gen is not None and not finished:
                await self._abort_vllm(rid)
                await gen.aclose()
            self._live.pop(rid, None)

    async def _resubmit_chunks(self, request, planner, wake, failure) -> AsyncIterator[list[int]]:
        """Fallback: one vLLM request per chunk whose prompt is everything fed so far; a forced
        fill is a length cut (max_tokens) followed by a synthetic fill."""
        rid = request.request_id
        processor = self.opts.logits_processor
        k = 0
        while (chunk := await self._next_chunk(rid, planner, wake, failure)) is not None:
            prompt = list(planner.fed)
            budget = self.opts.max_model_len - len(prompt)
            if budget < 1:
                raise RuntimeError("bistream context exceeds max_model_len")
            limit = chunk.force_fill_at if chunk.force_fill_at is not None else self._safety(request)
            emitted = len(planner.out_tokens) - planner.out_tokens.count(uid.FILL)
            kw = self._chunk_kwargs(request, Chunk(chunk.ids, chunk.final, None, chunk.history,
                                                   chunk.mask_ids), min(limit, budget), processor, emitted)
            sampled: list[int] = []
            aborted = False
            # aclosing: when our consumer leaves, the vLLM request is aborted now, not at GC time
            async with aclosing(self.generate_raw(rid, prompt, kw, vllm_id=f"{rid}#{k}")) as outs:
                async for out in outs:
                    sampled += out.outputs[0].token_ids
                    toks = [t for t in out.outputs[0].token_ids if t < uid.EOS]
                    if toks:
                        yield toks
                    aborted = out.outputs[0].finish_reason == "abort"
            k += 1
            if aborted or rid in self._aborted:
                return
            if not chunk.final and (not sampled or sampled[-1] != uid.FILL):
                if len(sampled) != limit:
                    raise RuntimeError("bistream chunk ended without a fill token")
                sampled.append(uid.FILL)
            planner.finish_chunk(sampled)

    # -- cancel ---------------------------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        """Abort the request's current vLLM request; its iterator ends. Unknown ids are ignored."""
        vid = self._live.get(request_id)
        if vid is None and request_id not in self._wake:
            return
        self._aborted.add(request_id)
        if request_id in self._wake:
            self._wake[request_id].set()
        if vid is not None:
            await self._abort_vllm(vid)

    async def _abort_vllm(self, vid: str) -> None:
        if self.engine is not None:
            try:
                await self.engine.abort(vid)
            except Exception:  # engine already shut down
                log.debug("abort of %s failed", vid, exc_info=True)

    def running_requests(self) -> int:
        """vLLM's count of running plus waiting requests (tests: a cancel must leave none)."""
        return self.engine.output_processor.get_num_unfinished_requests()
