"""``TTSEngine``: the streaming engine behind ``engine.api.Engine``.

Text pushed into a stream goes through the ``StreamingSegmenter``; each released segment is an
``SegmentEvent`` and (``segments`` input mode) one LLM request with the stream's voice prompt, whose
speech tokens are voiced by the scheduler as their own utterance (chunks numbered continuously per
stream). In ``bistream`` mode the segments' text ids feed one ``generate_bistream`` request instead.
All torch work runs in the scheduler's worker thread and in the LLM backend; the event loop only moves
lists of ints and numpy arrays.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import torch

from engine.api import (SAMPLE_RATE, AudioChunk, EngineError, SegmentEvent, StreamOptions, StreamStats,
                        VoiceInfo)
from engine.llm.backend import LLMRequest
from engine.scheduler import ChunkOut, FlowPrompt, Scheduler, SchedulerConfig, StreamSpec
from engine.streaming.policy import ChunkPolicy

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "engine.yaml"
MODES = ("zero_shot", "cross_lingual", "instruct2", "sft")
ENDOFPROMPT = "<|endofprompt|>"


@dataclass
class EngineConfig:
    model_dir: str = "pretrained_models/CosyVoice2-0.5B"
    device: str = "auto"
    dtype: str = "float32"
    llm_backend: str = "torch"
    vllm: dict = field(default_factory=dict)
    voices_dir: str | None = None
    first_chunk_tokens: int = 15
    first_chunk_max_tokens: int = 30
    lookahead_tokens: int = 3
    min_chunk_tokens: int = 15
    max_chunk_tokens: int = 100
    slack_fraction: float = 0.5
    flow_frame_budget: int = 8192
    urgent_frame_budget: int | None = 2048
    preempt_first_chunks: bool = True
    max_batch: int = 128
    max_streams: int = 512
    cuda_graphs: bool = True
    # Per-voice cache of the flow estimator's voice-only leading frames (engine/flow/prefix.py):
    # voices held, and frames per voice (the released model in bf16: 2.3 MB per voice and frame,
    # frames stored rounded up to 16). Off until an H100 run shows it pays (bench/RESULTS.md).
    prefix_cache_voices: int = 0                  # 0 = off
    prefix_cache_frames: int = 100
    graph_rows: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 192, 256])
    graph_frames: list[int] = field(default_factory=lambda: [64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768,
                                                               896, 1024, 1280, 1536, 1792, 2048])
    graph_max_elements: int = 32768
    encoder_graph_rows: list[int] = field(default_factory=lambda: [1, 2, 4, 8])   # [] = no encoder graphs
    encoder_graph_tokens: list[int] = field(default_factory=lambda: [64, 128, 192, 256])
    hift_graph_rows: list[int] = field(default_factory=lambda: [1, 2, 4, 8])      # [] = no HiFT graphs
    hift_graph_frames: list[int] = field(default_factory=lambda: [64, 128, 256])
    cuda_allocator: str | None = "expandable_segments:True"   # torch caching-allocator settings (CUDA)
    seed: int | None = None
    fixed_tokens_per_char: float | None = None

    @classmethod
    def load(cls, path: str | Path | None = DEFAULT_CONFIG, **overrides: Any) -> "EngineConfig":
        """Defaults < ``path`` (YAML) < ``overrides``; unknown keys raise ValueError."""
        values: dict[str, Any] = {}
        if path is not None and Path(path).exists():
            import yaml
            values.update(yaml.safe_load(Path(path).read_text()) or {})
        values.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown engine config key(s) {unknown}")
        return cls(**values)

    def policy(self, options: StreamOptions | None = None) -> ChunkPolicy:
        first = options.first_chunk_tokens if options else self.first_chunk_tokens
        top = min(options.max_chunk_tokens, self.max_chunk_tokens) if options else self.max_chunk_tokens
        return ChunkPolicy(first_chunk_tokens=first, first_chunk_max_tokens=min(self.first_chunk_max_tokens, top),
                           lookahead=self.lookahead_tokens,
                           min_chunk_tokens=min(self.min_chunk_tokens, top), max_chunk_tokens=top,
                           slack_fraction=self.slack_fraction)


@dataclass
class _Voice:
    """What a stream needs from a voice: LLM prompt (text ids, speech tokens) and flow prompt."""
    prompt_text_ids: list[int]
    speech_tokens: list[int]
    flow: FlowPrompt


_END = object()


_NO_STOP = 1 << 30   # min_tokens that no request reaches: never accept a stop id


class TTSStream:
    """One synthesis stream (``engine.api.EngineStream``). Methods are called on the event loop.

    Input path: ``push_text``/``flush``/``end`` run the segmenter (cheap, on the loop) and queue its
    segments; one pump task per stream normalizes them in order (wetext, in a worker thread), emits
    the ``SegmentEvent`` and starts the LLM work, and applies the segmenter's max-delay rule (poll)."""

    POLL_S = 0.05

    def __init__(self, engine: "TTSEngine", options: StreamOptions, voice: _Voice):
        self.stream_id = uuid.uuid4().hex[:16]
        self.engine, self.options, self.voice = engine, options, voice
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._inbox: asyncio.Queue = asyncio.Queue()      # raw segments, then _END
        self._segmenter = engine._new_segmenter()
        self._frontend = engine.frontend if options.text_normalization else engine.frontend_raw
        self._segments: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self._request_ids: list[str] = []
        self._seq = 0
        self._ended = self._closed = False
        self._opened = time.monotonic()
        self._first_audio: float | None = None
        self._audio_samples = 0
        self._bistream_text: asyncio.Queue | None = None
        self._bistream_marks: list[tuple[int, int]] = []   # (tokens decoded so far, newest segment)
        self._bistream_tokens = 0
        seed = None if engine.config.seed is None else engine.config.seed + next(engine._stream_counter)
        self._seed = seed
        engine.scheduler.open(StreamSpec(self.stream_id, voice.flow, self._sink, engine.config.policy(options),
                                         speed=options.speed, seed=seed))
        if options.input_mode == "bistream":
            self._bistream_text = asyncio.Queue()
            self.engine.scheduler.begin_utterance(self.stream_id, 0, None)
            self._spawn(self._run_bistream())
        self._spawn(self._pump())

    # ---- input ----
    def push_text(self, text: str) -> None:
        self._check_open()
        self._queue(self._segmenter.feed(text))

    def flush(self) -> None:
        self._check_open()
        self._queue(self._segmenter.flush())

    def end(self) -> None:
        if self._closed or self._ended:
            return
        self._queue(self._segmenter.end())
        self._ended = True
        self._inbox.put_nowait(_END)

    def cancel(self) -> None:
        """Stop all work now: LLM requests aborted, scheduler state dropped, iterator ends."""
        if self._closed:
            return
        self._closed = True
        self.engine.scheduler.cancel(self.stream_id)
        for rid in self._request_ids:
            asyncio.ensure_future(self.engine.backend.abort(rid))
        for t in self._tasks:
            t.cancel()
        self._events.put_nowait(_END)
        self.engine._streams.pop(self.stream_id, None)

    def stats(self) -> StreamStats:
        ttfa = None if self._first_audio is None else self._first_audio - self._opened
        return StreamStats(ttfa, self._audio_samples / SAMPLE_RATE, time.monotonic() - self._opened)

    async def __aiter__(self) -> AsyncIterator[SegmentEvent | AudioChunk]:
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # ---- internals ----
    def _check_open(self) -> None:
        if self._closed or self._ended:
            raise EngineError("context_ended", "the stream has ended")

    def _queue(self, segments: list[str]) -> None:
        for seg in segments:
            self._inbox.put_nowait(seg)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if exc is not None:
            log.error("stream %s: task failed: %r", self.stream_id, exc)
            self._fail(exc if isinstance(exc, EngineError) else EngineError("engine_error", repr(exc)))

    def _fail(self, err: EngineError) -> None:
        if self._closed:
            return
        self._events.put_nowait(err)
        self.cancel()

    async def _pump(self) -> None:
        """Segments in order: normalize, SegmentEvent, LLM request; polls the segmenter's delays."""
        while True:
            try:
                timeout = self.POLL_S if self._segmenter.buffered and not self._ended else None
                item = await asyncio.wait_for(self._inbox.get(), timeout)
            except asyncio.TimeoutError:
                for seg in self._segmenter.poll():
                    await self._release(seg)
                continue
            if item is _END:
                if self._bistream_text is not None:
                    self._bistream_text.put_nowait(None)
                else:
                    self.engine.scheduler.end_stream(self.stream_id)
                return
            await self._release(item)

    async def _release(self, raw: str) -> None:
        text = await asyncio.to_thread(self._frontend.normalize, raw, False)
        if not text.strip():
            return
        index = len(self._segments)
        self._segments.append(text)
        self._events.put_nowait(SegmentEvent(index, text))
        text_ids = self.engine.tokenizer.encode(text)
        if self._bistream_text is not None:
            self._bistream_text.put_nowait((index, text_ids))
            return
        self.engine.scheduler.begin_utterance(self.stream_id, index, index)
        self._spawn(self._run_segment(index, text, text_ids))

    def _request(self, text: str, text_ids: list[int]) -> LLMRequest:
        opts, voice = self.options, self.voice
        prompt_text_ids, speech = voice.prompt_text_ids, voice.speech_tokens
        if opts.mode in ("cross_lingual", "sft"):
            prompt_text_ids, speech = [], []
        elif opts.mode == "instruct2":
            prompt_text_ids, speech = self.engine.tokenizer.encode(opts.instruct_text + ENDOFPROMPT), []
        rid = f"{self.stream_id}-{len(self._request_ids)}"
        self._request_ids.append(rid)
        seed = None if self._seed is None else self._seed * 1000 + len(self._request_ids)
        req = LLMRequest(rid, text_ids, prompt_text_ids, speech, seed=seed)
        per_char = self.engine.config.fixed_tokens_per_char
        if per_char and text:
            req.min_tokens = req.max_tokens = max(1, math.ceil(len(text) * per_char))
        elif per_char:
            # bistream: the cap is known only at end of text; _run_bistream aborts the request there
            req.min_tokens = _NO_STOP
        return req

    async def _run_segment(self, index: int, text: str, text_ids: list[int]) -> None:
        sch = self.engine.scheduler
        try:
            if text_ids:
                async with aclosing(self.engine.backend.generate(self._request(text, text_ids))) as tokens:
                    async for toks in tokens:
                        if self._closed:
                            return
                        sch.add_tokens(self.stream_id, index, toks)
        finally:
            if not self._closed:
                sch.end_utterance(self.stream_id, index)

    async def _run_bistream(self) -> None:
        sch = self.engine.scheduler
        chars = [0]
        ended = asyncio.Event()

        async def text_ids():
            while True:
                item = await self._bistream_text.get()
                if item is None:
                    ended.set()
                    return
                index, ids = item
                chars[0] += len(self._segments[index])
                self._bistream_marks.append((self._bistream_tokens, index))
                yield ids

        req = self._request("", [])
        per_char = self.engine.config.fixed_tokens_per_char
        try:
            async with aclosing(self.engine.backend.generate_bistream(req, text_ids())) as tokens:
                async for toks in tokens:
                    if self._closed:
                        return
                    if per_char and ended.is_set():
                        cap = max(1, math.ceil(chars[0] * per_char))
                        toks = toks[:max(0, cap - self._bistream_tokens)]
                    self._bistream_tokens += len(toks)
                    if toks:
                        sch.add_tokens(self.stream_id, 0, toks)
                    if per_char and ended.is_set() and self._bistream_tokens >= math.ceil(chars[0] * per_char):
                        break       # leaving the aclosing block ends the LLM request
        finally:
            if not self._closed:
                sch.end_utterance(self.stream_id, 0)
                sch.end_stream(self.stream_id)

    def _sink(self, chunk: ChunkOut | None) -> None:
        """Called on the scheduler thread."""
        self._loop.call_soon_threadsafe(self._deliver, chunk)

    def _deliver(self, chunk: ChunkOut | None) -> None:
        if self._closed:
            return
        if chunk is None:
            self._fail(EngineError("engine_error", f"token2wav worker failed: {self.engine.scheduler.error!r}"))
            return
        index = self._segment_of(chunk)
        if len(chunk.samples) and self._first_audio is None:
            self._first_audio = time.monotonic()
        self._audio_samples += len(chunk.samples)
        text = self._segments[index] if 0 <= index < len(self._segments) else ""
        # The upstream cross-fade (two Hamming halves, gain up to 1.08) can push a sample past the
        # API's [-1, 1] range; clip there.
        samples = np.clip(chunk.samples, -1.0, 1.0)
        self._events.put_nowait(AudioChunk(self._seq, samples, index, text, chunk.final))
        self._seq += 1
        if chunk.final:
            self._closed = True
            self._events.put_nowait(_END)
            self.engine._streams.pop(self.stream_id, None)

    def _segment_of(self, chunk: ChunkOut) -> int:
        if self._bistream_text is None:
            return chunk.utterance if chunk.utterance >= 0 else max(0, len(self._segments) - 1)
        # bistream: the newest segment whose text had been fed when the chunk's last token was decoded
        index = 0
        for tokens_before, seg in self._bistream_marks:
            if tokens_before <= max(0, chunk.token_end - 1):
                index = seg
        return index


class TTSEngine:
    """``engine.api.Engine`` over a model directory (see ``EngineConfig``)."""

    def __init__(self, config: EngineConfig | None = None, backend=None, models=None):
        """``backend`` (already started) and ``models`` may be injected; otherwise ``start`` builds
        them. The engine owns its backend either way: ``close`` closes it unless told to keep it."""
        self.config = config or EngineConfig.load()
        self.backend = backend
        self.models = models
        self.scheduler: Scheduler | None = None
        self.tokenizer = None
        self.frontend = None
        self.voices = None
        self.prompts = None
        self._streams: dict[str, TTSStream] = {}
        self._stream_counter = itertools.count()
        self._ready = False

    # ---- lifecycle ----
    async def start(self) -> None:
        """Build what was not injected (LLM backend, models, frontend, token2wav worker, CUDA graphs)
        and warm up. On failure it closes what it holds, the backend included, then raises."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        if cfg.llm_backend == "auto":
            cfg.llm_backend = resolve_llm_backend(cfg.device)
        if self.backend is None and cfg.llm_backend == "vllm":
            # vLLM checks that its share of the card is free, so it starts before flow/HiFT allocate.
            self.backend = self._build_backend()
            await self.backend.start()
        if self.models is None:
            from engine.models import load_models
            if cfg.cuda_allocator and str(cfg.device).startswith(("cuda", "auto")) and torch.cuda.is_available():
                # Growable segments instead of fixed blocks: varying batch shapes then do not strand
                # reserved memory (the card's peak stayed 2-3x the allocated peak without this).
                torch.cuda.memory._set_allocator_settings(cfg.cuda_allocator)
            self.models = await asyncio.to_thread(load_models, cfg.model_dir, cfg.device, cfg.dtype,
                                                  cfg.llm_backend == "torch" and self.backend is None)
        m = self.models
        await asyncio.to_thread(self._build_frontend)
        if self.backend is None:
            self.backend = self._build_backend()
            await self.backend.start()
        from engine.flow.prefix import PrefixStore, VoicePrefixCache
        from engine.streaming.runner import BatchedToken2Wav
        prefix_cache = None
        if cfg.prefix_cache_voices > 0 and cfg.prefix_cache_frames > 0:
            prefix_cache = VoicePrefixCache(PrefixStore(m.flow.decoder.estimator, cfg.prefix_cache_voices,
                                                        cfg.prefix_cache_frames, steps=10))
            log.info("flow prefix cache: %d voices x %d frames, %.0f MB", cfg.prefix_cache_voices,
                     prefix_cache.store.frames, prefix_cache.store.bytes / 1e6)
        hift = m.hift
        if cfg.cuda_graphs and m.device.type == "cuda":
            hift = await asyncio.to_thread(self._install_cuda_graphs, prefix_cache)
        runner = BatchedToken2Wav(m.flow, hift, m.device, lookahead=cfg.lookahead_tokens, prefix_cache=prefix_cache)
        self.scheduler = Scheduler(runner, SchedulerConfig(cfg.flow_frame_budget, cfg.max_batch,
                                                           cfg.urgent_frame_budget, cfg.preempt_first_chunks),
                                   m.device, hold_llm=getattr(self.backend, "hold_decode", None))
        await asyncio.to_thread(runner.warmup)
        self.scheduler.start()
        self._ready = True

    def _install_cuda_graphs(self, prefix_cache):
        """Wrap the flow estimator (and, if configured, the flow encoder and HiFT) in their CUDA-graph
        versions and capture every bucket now (estimator calls through ``prefix_cache``'s store, if
        any); returns the HiFT module the runner should call."""
        from engine.streaming.cuda_graphs import GraphedHiFT, install_graphed_encoder, install_graphed_estimator
        from engine.token2wav import SOURCE_CACHE_LEN
        cfg, m = self.config, self.models
        est = install_graphed_estimator(m.flow, cfg.graph_rows, cfg.graph_frames, cfg.graph_max_elements)
        est.prefix_store = prefix_cache.store if prefix_cache else None
        counts = {"estimator": est.capture_all(m.device, m.flow.decoder.estimator_dtype)}
        if cfg.encoder_graph_rows:
            enc = install_graphed_encoder(m.flow, cfg.encoder_graph_rows, cfg.encoder_graph_tokens)
            counts["encoder"] = enc.capture_all(m.device, torch.float32, cfg.lookahead_tokens)
        hift = m.hift
        if cfg.hift_graph_rows:
            hift = GraphedHiFT(m.hift, cfg.hift_graph_rows, cfg.hift_graph_frames)
            counts["hift"] = hift.capture_all(m.device, SOURCE_CACHE_LEN)
        log.info("captured CUDA graphs: %s", counts)
        return hift

    def _build_frontend(self) -> None:
        import tempfile

        from engine.checkpoint import ModelDir
        from engine.frontend.text import TextFrontend
        from engine.frontend.tokenizer import CosyVoice2Tokenizer
        from engine.frontend.voices import VoiceStore
        md = ModelDir(Path(self.config.model_dir))
        self.tokenizer = CosyVoice2Tokenizer(md.tokenizer_dir)
        self.frontend = TextFrontend(self.tokenizer)
        self.frontend_raw = TextFrontend(self.tokenizer, enabled=False)   # upstream text_frontend=False
        try:
            from engine.frontend.prompt import PromptProcessor
            self.prompts = PromptProcessor(md.root, "cpu", text_frontend=self.frontend)
        except Exception as exc:  # a model dir without the ONNX models can still serve stored voices
            log.warning("prompt processor unavailable (%r): voice registration disabled", exc)
        voices_dir = self.config.voices_dir or tempfile.mkdtemp(prefix="cosy-voices-")
        self.voices = VoiceStore(voices_dir, md.spk2info, processor=self.prompts, tokenizer=self.tokenizer)

    def _build_backend(self):
        cfg = self.config
        if cfg.llm_backend == "torch":
            from engine.llm.torch_backend import TorchLLMBackend
            return TorchLLMBackend(self.models.llm, self.models.device)
        if cfg.llm_backend == "vllm":
            from engine.llm.vllm_backend.backend import VLLMBackend, VLLMOptions
            return VLLMBackend(cfg.model_dir, VLLMOptions(**cfg.vllm))
        raise EngineError("invalid_field", f"unknown llm backend {cfg.llm_backend!r}")

    async def close(self, keep_backend: bool = False) -> None:
        """Cancel every stream and stop the token2wav worker; close the LLM backend too unless
        ``keep_backend`` (the caller takes it over, e.g. to start another engine on it)."""
        for s in list(self._streams.values()):
            s.cancel()
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.close)
        if self.backend is not None and not keep_backend:
            await self.backend.close()
        self._ready = False

    def ready(self) -> bool:
        return self._ready

    # ---- streams ----
    async def open_stream(self, options: StreamOptions) -> TTSStream:
        """Validate ``options`` and open a stream (raises EngineError with a protocol code).

        An inline prompt's audio is decoded and run through the prompt models in a worker thread."""
        if not self._ready:
            raise EngineError("not_ready", "the engine is still loading")
        if options.mode not in MODES:
            raise EngineError("invalid_field", f"mode must be one of {MODES}")
        if options.input_mode not in ("segments", "bistream"):
            raise EngineError("invalid_field", "input_mode must be 'segments' or 'bistream'")
        if options.input_mode == "bistream" and options.mode in ("instruct2",):
            raise EngineError("invalid_field", "bistream input is not available with instruct2")
        if not 0.5 <= options.speed <= 2.0:
            raise EngineError("invalid_field", "speed must be within [0.5, 2.0]")
        if not 1 <= options.first_chunk_tokens <= 200 or not 1 <= options.max_chunk_tokens <= 400:
            raise EngineError("invalid_field", "first_chunk_tokens/max_chunk_tokens out of range")
        if options.mode == "instruct2" and not options.instruct_text:
            raise EngineError("missing_field", "instruct2 needs instruct_text")
        if len(self._streams) >= self.config.max_streams:
            raise EngineError("too_many_contexts", f"the engine serves at most {self.config.max_streams} streams")
        voice = await asyncio.to_thread(self._resolve_voice, options)
        if len(self._streams) >= self.config.max_streams:   # checked again: others opened meanwhile
            raise EngineError("too_many_contexts", f"the engine serves at most {self.config.max_streams} streams")
        stream = TTSStream(self, options, voice)
        self._streams[stream.stream_id] = stream
        return stream

    def _new_segmenter(self):
        from engine.frontend.segmenter import StreamingSegmenter
        return StreamingSegmenter()

    def _resolve_voice(self, options: StreamOptions) -> _Voice:
        if options.inline_prompt is not None:
            if self.prompts is None:
                raise EngineError("invalid_audio", "this model directory cannot process prompt audio")
            try:
                vp = self.prompts.process(options.inline_prompt.prompt_text, options.inline_prompt.audio)
            except EngineError:
                raise
            except Exception as exc:
                raise EngineError("invalid_audio", f"prompt audio rejected: {exc}") from exc
        elif options.voice_id is not None:
            vp = self.voices.get(options.voice_id)       # EngineError voice_not_found
        else:
            raise EngineError("missing_field", "a stream needs voice_id or inline_prompt")
        if options.mode != "sft" and int(vp.speech_tokens.numel()) == 0:
            raise EngineError("invalid_field", f"voice {options.voice_id!r} has no prompt speech: use mode sft")
        return voice_from_prompt(vp, options.mode)

    # ---- voices ----
    async def register_voice(self, voice_id: str, prompt_text: str, audio: bytes,
                             overwrite: bool = False) -> VoiceInfo:
        return await asyncio.to_thread(self.voices.register, voice_id, prompt_text, audio, overwrite)

    def list_voices(self) -> list[VoiceInfo]:
        return self.voices.list()

    async def delete_voice(self, voice_id: str) -> None:
        self.voices.delete(voice_id)

    def metrics(self) -> dict[str, float]:
        out = {"live_streams": float(len(self._streams))}
        if self.scheduler is not None:
            out.update(self.scheduler.stream_stats())
        if self.models is not None and self.models.device.type == "cuda":
            out["gpu_memory_allocated_bytes"] = float(torch.cuda.memory_allocated(self.models.device))
            out["gpu_memory_peak_bytes"] = float(torch.cuda.max_memory_allocated(self.models.device))
        return out


def resolve_llm_backend(device: str) -> str:
    """'auto': vLLM when it is installed and the engine runs on CUDA, else the torch backend."""
    import importlib.util
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "vllm" if on_cuda and importlib.util.find_spec("vllm") is not None else "torch"


def voice_from_prompt(vp, mode: str) -> _Voice:
    """Adapt a frontend ``VoicePrompt`` to what a stream needs (sft: embedding only)."""
    tokens = vp.speech_tokens.to(torch.long).reshape(-1)
    feat = vp.speech_feat.to(torch.float32).reshape(-1, 80)
    emb = vp.embedding.to(torch.float32).reshape(-1)
    if mode == "sft":
        tokens, feat = tokens[:0], feat[:0]
    return _Voice(list(vp.prompt_text_ids), tokens.tolist(), FlowPrompt(tokens, feat, emb))
