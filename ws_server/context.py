"""One live synthesis context: an engine stream, its output encoder and the task that pumps its
events into the connection's send queue."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from engine.api import AudioChunk, EngineError, EngineStream, SegmentEvent
from protocol import codec, errors
from protocol import messages as m
from ws_server.audio import ENGINE_RATE, AudioEncoder
from ws_server.metrics import Metrics
from ws_server.outbox import Outbox

log = logging.getLogger("ws_server")


@dataclass
class PlaybackClock:
    """Tracks what a client playing the audio in real time would hear, to count underruns.

    An underrun is an audio message queued after the audio sent before it would have finished
    playing (playback starting when the first audio message is queued)."""
    first_audio_at: float | None = None
    audio_seconds: float = 0.0
    underruns: int = 0

    def on_audio(self, now: float, seconds: float) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = now
        elif now > self.first_audio_at + self.audio_seconds:
            self.underruns += 1
        self.audio_seconds += seconds


@dataclass
class Context:
    context_id: str
    stream: EngineStream
    encoder: AudioEncoder
    outbox: Outbox
    metrics: Metrics
    started_at: float = field(default_factory=time.monotonic)
    first_text_at: float | None = None
    text_bytes: int = 0
    ended: bool = False
    task: asyncio.Task | None = None
    clock: PlaybackClock = field(default_factory=PlaybackClock)

    def push_text(self, text: str) -> None:
        if text and self.first_text_at is None:
            self.first_text_at = time.monotonic()
        self.stream.push_text(text)

    async def pump(self) -> None:
        """Forward the engine's events as segment/audio messages, then ``done`` (or ``error``)."""
        seq, final_sent = 0, False
        try:
            async for event in self.stream:
                if isinstance(event, SegmentEvent):
                    await self._send(m.Segment(self.context_id, event.index, event.text))
                elif isinstance(event, AudioChunk):
                    await self._send_audio(seq, event.samples, event.segment_index, event.segment_text,
                                           event.final)
                    seq, final_sent = seq + 1, event.final
            if not final_sent:
                # The engine ended without a final chunk: flush the resampler (exact length) and
                # keep the rule that the last audio message has final=True.
                await self._send_audio(seq, np.zeros(0, np.float32), -1, "", True)
            await self._send(self._done())
        except asyncio.CancelledError:
            raise
        except EngineError as exc:
            self.outbox.put_control(codec.encode(m.Error(exc.code, exc.message, self.context_id)))
            self.metrics.errors_total += 1
        except Exception as exc:
            log.exception("context %s failed", self.context_id)
            self.stream.cancel()
            self.outbox.put_control(codec.encode(m.Error(errors.ENGINE_ERROR, f"synthesis failed: {exc}",
                                                         self.context_id)))
            self.metrics.errors_total += 1

    async def _send_audio(self, seq: int, samples: np.ndarray, segment_index: int, text: str,
                          final: bool) -> None:
        data = self.encoder.encode(samples, final=final)
        if len(samples):
            now = time.monotonic()
            if self.clock.first_audio_at is None:
                self.metrics.ttfa.observe(now - (self.first_text_at or self.started_at))
            before = self.clock.underruns
            self.clock.on_audio(now, len(samples) / ENGINE_RATE)
            self.metrics.underruns_total += self.clock.underruns - before
            self.metrics.audio_seconds_total += len(samples) / ENGINE_RATE
        await self._send(m.Audio(self.context_id, seq, data, self.encoder.encoding, self.encoder.sample_rate,
                                 segment_index, text, final))

    def _done(self) -> m.Done:
        stats = self.stream.stats()
        now = time.monotonic()
        ttfa = (self.clock.first_audio_at - (self.first_text_at or self.started_at)
                if self.clock.first_audio_at is not None else None)
        return m.Done(self.context_id, ttfa, self.clock.audio_seconds, now - self.started_at,
                      stats.real_time_factor, self.clock.underruns)

    async def _send(self, msg: m.Message) -> None:
        await self.outbox.put_stream(self.context_id, codec.encode(msg))

    async def cancel(self) -> None:
        """Stop the engine stream and the pump; afterwards nothing of this context is queued."""
        self.stream.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.outbox.drop(self.context_id)
