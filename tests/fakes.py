"""A small fake of ``engine.api.Engine`` for protocol and error-path tests, and helpers that run a real
``TTSServer`` on 127.0.0.1 and talk to it.

FakeEngine: text is released as a segment at '.', '!', '?', on flush and at end; each segment becomes
``TOKENS_PER_CHAR`` speech tokens per character, sent as chunks of ``chunk_tokens`` tokens (960 samples
a token, a 220 Hz tone) with ``chunk_delay_s`` between chunks. Text containing "FAIL" makes the stream
raise EngineError("engine_error"); "CRASH" raises RuntimeError.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import time

import numpy as np
import soundfile as sf

from engine.api import AudioChunk, EngineError, SegmentEvent, StreamOptions, StreamStats, VoiceInfo
from protocol import codec
from protocol import messages as m

SAMPLES_PER_TOKEN = 960
TOKENS_PER_CHAR = 1
_END, _CANCEL = object(), object()


class FakeStream:
    def __init__(self, engine: "FakeEngine", stream_id: str, options: StreamOptions):
        self.engine = engine
        self.stream_id = stream_id
        self.options = options
        self.cancelled = False
        self.pushed: list[str] = []
        self.chunks = 0                  # audio chunks this stream has produced
        self._buf = ""
        self._queue: asyncio.Queue = asyncio.Queue()
        self._opened = time.monotonic()
        self._first_audio: float | None = None
        self._audio_s = 0.0

    def push_text(self, text: str) -> None:
        self.pushed.append(text)
        self._buf += text
        while True:
            cut = min((i for i in (self._buf.find(c) for c in ".!?") if i >= 0), default=-1)
            if cut < 0:
                break
            self._release(self._buf[:cut + 1])
            self._buf = self._buf[cut + 1:]

    def flush(self) -> None:
        self._release(self._buf)
        self._buf = ""

    def end(self) -> None:
        self.flush()
        self._queue.put_nowait(_END)

    def cancel(self) -> None:
        self.cancelled = True
        self._queue.put_nowait(_CANCEL)

    def stats(self) -> StreamStats:
        return StreamStats(None if self._first_audio is None else self._first_audio - self._opened,
                           self._audio_s, time.monotonic() - self._opened)

    def _release(self, text: str) -> None:
        if text.strip():
            self._queue.put_nowait(text.strip())

    async def __aiter__(self):
        self.engine.live.add(self.stream_id)
        try:
            seg_index, seq = 0, 0
            while True:
                item = await self._queue.get()
                if item is _CANCEL or self.cancelled:
                    return
                if item is _END:
                    yield AudioChunk(seq, np.zeros(0, np.float32), max(seg_index - 1, 0), "", True)
                    return
                if "CRASH" in item:
                    raise RuntimeError("fake crash")
                if "FAIL" in item:
                    raise EngineError("engine_error", "fake failure")
                yield SegmentEvent(seg_index, item)
                tokens = TOKENS_PER_CHAR * len(item)
                size = self.engine.chunk_tokens
                for start in range(0, tokens, size):
                    await asyncio.sleep(self.engine.chunk_delay_s)
                    if self.cancelled:
                        return
                    n = min(size, tokens - start) * SAMPLES_PER_TOKEN
                    t = np.arange(n) / 24000.0
                    samples = (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
                    self._first_audio = self._first_audio or time.monotonic()
                    self._audio_s += n / 24000.0
                    self.engine.chunks_made += 1
                    self.chunks += 1
                    yield AudioChunk(seq, samples, seg_index, item, False)
                    seq += 1
                seg_index += 1
        finally:
            self.engine.live.discard(self.stream_id)


class FakeEngine:
    def __init__(self, chunk_tokens: int = 10, chunk_delay_s: float = 0.002, ready: bool = True):
        self.chunk_tokens = chunk_tokens
        self.chunk_delay_s = chunk_delay_s
        self._ready = ready
        self.voices: dict[str, VoiceInfo] = {"default": VoiceInfo("default", "hello", 1.0, "sft")}
        self.streams: list[FakeStream] = []
        self.live: set[str] = set()      # streams whose iterator is running
        self.chunks_made = 0

    async def start(self) -> None:
        self._ready = True

    async def close(self) -> None:
        self._ready = False

    def ready(self) -> bool:
        return self._ready

    async def open_stream(self, options: StreamOptions) -> FakeStream:
        if options.voice_id is not None and options.voice_id not in self.voices:
            raise EngineError("voice_not_found", f"no voice {options.voice_id!r}")
        s = FakeStream(self, f"s{len(self.streams)}", options)
        self.streams.append(s)
        return s

    async def register_voice(self, voice_id: str, prompt_text: str, audio: bytes,
                             overwrite: bool = False) -> VoiceInfo:
        if voice_id in self.voices and not overwrite:
            raise EngineError("voice_exists", voice_id)
        try:
            data, sr = sf.read(io.BytesIO(audio))
        except Exception:
            raise EngineError("invalid_audio", "cannot decode prompt audio") from None
        info = VoiceInfo(voice_id, prompt_text, len(data) / sr)
        self.voices[voice_id] = info
        return info

    def list_voices(self) -> list[VoiceInfo]:
        return list(self.voices.values())

    async def delete_voice(self, voice_id: str) -> None:
        if voice_id not in self.voices:
            raise EngineError("voice_not_found", f"no voice {voice_id!r}")
        del self.voices[voice_id]

    def metrics(self) -> dict[str, float]:
        return {"live_streams": len(self.live)}


# ---------------------------------------------------------------- helpers for server tests

def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


@contextlib.asynccontextmanager
async def running_server(engine, **overrides):
    """A started TTSServer on 127.0.0.1 with an ephemeral port; shut down on exit."""
    from ws_server.app import TTSServer
    from ws_server.config import ServerConfig
    cfg = ServerConfig(host="127.0.0.1", port=0, **overrides)
    server = TTSServer(engine, cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(deadline_s=0)


class Client:
    """A thin protocol client for tests: ``send(msg)``, ``recv() -> Message``, ``until(pred)``."""

    def __init__(self, ws):
        self.ws = ws

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, server, path: str = "/v1/tts", **kw):
        from websockets.asyncio.client import connect
        async with connect(f"ws://127.0.0.1:{server.port}{path}", max_size=None, **kw) as ws:
            yield cls(ws)

    async def send(self, msg: m.Message) -> None:
        await self.ws.send(codec.encode(msg))

    async def recv(self, timeout: float = 10.0) -> m.Message:
        return codec.decode_server(await asyncio.wait_for(self.ws.recv(), timeout))

    async def until(self, pred, timeout: float = 20.0) -> list[m.Message]:
        """Messages received up to and including the first one for which ``pred`` is true."""
        out = []
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                out.append(msg)
                if pred(msg):
                    return out


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """A minimal async HTTP/1.1 GET against 127.0.0.1 (the server shares the test's event loop)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), hdrs, body
