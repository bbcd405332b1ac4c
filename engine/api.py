"""The engine's public, backend-agnostic API (no tensors cross it; audio is numpy float32 at 24 kHz).

The network layer (``ws_server``) uses only what this module defines. ``engine.engine.TTSEngine``
implements it.

Lifecycle of one stream::

    stream = await engine.open_stream(StreamOptions(voice_id="alice"))
    stream.push_text("Hello wor"); stream.push_text("ld. How are"); stream.end()
    async for event in stream:          # SegmentEvent and AudioChunk, in order
        ...                             # the last AudioChunk has final=True
    # or stream.cancel() at any time: the iterator ends after a StreamCancelled sentinel-free stop
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol

import numpy as np

Mode = Literal["zero_shot", "cross_lingual", "instruct2", "sft"]
InputMode = Literal["segments", "bistream"]
SAMPLE_RATE = 24000


class EngineError(Exception):
    """A request the engine refuses; ``code`` is a stable machine-readable string (protocol error code)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class InlinePrompt:
    """A voice given with the request instead of a stored voice id."""
    prompt_text: str
    audio: bytes  # any format soundfile reads (wav, flac, ogg), any sample rate >= 16 kHz


@dataclass
class StreamOptions:
    voice_id: str | None = None
    inline_prompt: InlinePrompt | None = None
    mode: Mode = "zero_shot"
    instruct_text: str = ""
    speed: float = 1.0
    input_mode: InputMode = "segments"
    text_normalization: bool = True
    first_chunk_tokens: int = 15      # speech tokens in the first audio chunk (plus 3 lookahead)
    max_chunk_tokens: int = 100       # chunks grow up to this while the stream is ahead of playback


@dataclass
class SegmentEvent:
    """Text released for synthesis (after segmentation/normalization)."""
    index: int
    text: str


@dataclass
class AudioChunk:
    seq: int                 # 0, 1, 2, ... per stream
    samples: np.ndarray      # float32 [n], mono, 24 kHz, in [-1, 1]
    segment_index: int       # the segment this audio voices
    segment_text: str
    final: bool              # last chunk of the whole stream


@dataclass
class StreamStats:
    time_to_first_audio_s: float | None
    audio_seconds: float
    wall_seconds: float

    @property
    def real_time_factor(self) -> float | None:
        return self.wall_seconds / self.audio_seconds if self.audio_seconds > 0 else None


@dataclass
class VoiceInfo:
    voice_id: str
    prompt_text: str
    prompt_seconds: float
    kind: Literal["zero_shot", "sft"] = "zero_shot"


class EngineStream(Protocol):
    stream_id: str

    def push_text(self, text: str) -> None: ...
    def flush(self) -> None: ...
    def end(self) -> None: ...
    def cancel(self) -> None: ...
    def stats(self) -> StreamStats: ...
    def __aiter__(self) -> AsyncIterator[SegmentEvent | AudioChunk]: ...


class Engine(Protocol):
    async def start(self) -> None: ...            # load + warm up; ready() is True afterwards
    async def close(self) -> None: ...
    def ready(self) -> bool: ...
    async def open_stream(self, options: StreamOptions) -> EngineStream: ...   # raises EngineError
    # (async: an inline prompt is processed off the event loop before the stream opens)
    async def register_voice(self, voice_id: str, prompt_text: str, audio: bytes,
                             overwrite: bool = False) -> VoiceInfo: ...
    def list_voices(self) -> list[VoiceInfo]: ...
    async def delete_voice(self, voice_id: str) -> None: ...
    def metrics(self) -> dict[str, float]: ...    # queue depths, live streams, GPU memory bytes, ...
