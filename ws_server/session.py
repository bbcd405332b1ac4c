"""One WebSocket connection speaking protocol v1: reads client frames, runs its contexts, and writes
every server message through the connection's bounded ``Outbox``."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from engine.api import EngineError, InlinePrompt, StreamOptions
from protocol import codec, errors
from protocol import messages as m
from protocol.errors import CloseCode, ProtocolError
from ws_server.audio import AudioEncoder
from ws_server.context import Context
from ws_server.outbox import Outbox

if TYPE_CHECKING:
    from ws_server.app import TTSServer

log = logging.getLogger("ws_server")


class Session:
    def __init__(self, server: "TTSServer", ws: ServerConnection):
        self.server = server
        self.cfg = server.config
        self.engine = server.engine
        self.metrics = server.metrics
        self.ws = ws
        self.outbox = Outbox(self.cfg.send_queue_bytes)
        self.contexts: dict[str, Context] = {}
        self._tasks: set[asyncio.Task] = set()   # voice operations in flight
        self._errors = 0
        self._last_activity = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until the client leaves, a fatal violation or shutdown."""
        writer = asyncio.create_task(self._write_loop())
        try:
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            await self.cancel_all(notify=False)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.outbox.close()
            try:
                await asyncio.wait_for(writer, timeout=2.0)
            except (asyncio.TimeoutError, ConnectionClosed):
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def cancel_all(self, notify: bool) -> None:
        """Cancel every live context (``notify``: send ``cancelled`` for each)."""
        for cid in list(self.contexts):
            await self._cancel(cid, notify)

    async def close(self, code: int, reason: str) -> None:
        """Flush what is queued (briefly), then close the socket with ``code``."""
        self.outbox.close()
        deadline = time.monotonic() + 2.0
        while self.outbox.queued_bytes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.ws.close(code, reason)

    async def _write_loop(self) -> None:
        while (frame := await self.outbox.get()) is not None:
            await self.ws.send(frame)

    async def _read_loop(self) -> None:
        while True:
            frame = await self._recv()
            if frame is None:
                return
            self._last_activity = time.monotonic()
            try:
                await self._handle_frame(frame)
            except ProtocolError as exc:
                if not await self._error(exc.code, exc.message, exc.context_id):
                    return
            except ConnectionClosed:
                raise
            except Exception as exc:   # a server bug: report it, keep the connection
                log.exception("failed to handle a client message")
                if not await self._error(errors.INTERNAL_ERROR, f"internal error: {exc!r}"):
                    return

    async def _recv(self) -> str | bytes | None:
        """The next frame; None after an idle close (no message and nothing running for idle_timeout_s)."""
        idle = self.cfg.idle_timeout_s
        while True:
            busy = bool(self.contexts or self._tasks)
            if idle > 0 and not busy and time.monotonic() - self._last_activity >= idle:
                self._send_control(m.Error(errors.IDLE_TIMEOUT, f"no message for {idle:g} s"))
                await self.close(CloseCode.IDLE, "idle timeout")
                return None
            timeout = None if idle <= 0 else idle if busy else self._last_activity + idle - time.monotonic()
            try:
                return await asyncio.wait_for(self.ws.recv(), timeout=timeout)
            except asyncio.TimeoutError:
                pass   # re-check: a context that ended meanwhile has updated _last_activity

    # ------------------------------------------------------------------ dispatch

    async def _handle_frame(self, frame: str | bytes) -> None:
        if isinstance(frame, str):
            raise ProtocolError(errors.BAD_FRAME, "text frames are not accepted: send msgpack in binary frames")
        if len(frame) > self.cfg.max_frame_bytes:
            raise ProtocolError(errors.FRAME_TOO_LARGE,
                                f"frame of {len(frame)} bytes exceeds max_frame_bytes={self.cfg.max_frame_bytes}")
        msg = codec.decode_client(frame)
        try:
            await self._dispatch(msg)
        except EngineError as exc:   # e.g. text pushed into a stream the engine has just failed
            raise ProtocolError(exc.code, exc.message, getattr(msg, "context_id", None)) from None

    async def _dispatch(self, msg: m.Message) -> None:
        if isinstance(msg, m.Start):
            await self._start(msg)
        elif isinstance(msg, m.Text):
            self._text(msg)
        elif isinstance(msg, m.Flush):
            self._live(msg.context_id, open_only=True).stream.flush()
        elif isinstance(msg, m.End):
            ctx = self._live(msg.context_id, open_only=True)
            ctx.ended = True
            ctx.stream.end()
        elif isinstance(msg, m.Cancel):
            self._live(msg.context_id)
            await self._cancel(msg.context_id, notify=True)
        elif isinstance(msg, m.VoiceRegister):
            self._spawn(self._voice_register(msg))
        elif isinstance(msg, m.VoiceList):
            voices = [_voice(v) for v in self.engine.list_voices()]
            self._send_control(m.Voices(voices))
        elif isinstance(msg, m.VoiceDelete):
            self._spawn(self._voice_delete(msg))

    def _live(self, context_id: str, open_only: bool = False) -> Context:
        ctx = self.contexts.get(context_id)
        if ctx is None:
            raise ProtocolError(errors.UNKNOWN_CONTEXT, f"no live context {context_id!r}", context_id)
        if open_only and ctx.ended:
            raise ProtocolError(errors.CONTEXT_ENDED, f"context {context_id!r} already received end", context_id)
        return ctx

    async def _start(self, msg: m.Start) -> None:
        cid = msg.context_id
        if self.server.draining:
            raise ProtocolError(errors.SHUTTING_DOWN, "server is shutting down", cid)
        if not self.engine.ready():
            raise ProtocolError(errors.NOT_READY, "models are still loading; retry when GET /ready is 200", cid)
        if cid in self.contexts:
            raise ProtocolError(errors.CONTEXT_EXISTS, f"context {cid!r} is live", cid)
        if len(self.contexts) >= self.cfg.max_contexts_per_connection:
            raise ProtocolError(errors.TOO_MANY_CONTEXTS,
                                f"at most {self.cfg.max_contexts_per_connection} live contexts per connection", cid)
        self._check_text_budget(cid, 0, msg.text)
        options = StreamOptions(
            voice_id=msg.voice_id,
            inline_prompt=InlinePrompt(msg.prompt.text, msg.prompt.audio) if msg.prompt else None,
            mode=msg.mode, instruct_text=msg.instruct_text, speed=msg.speed, input_mode=msg.input_mode,
            text_normalization=msg.text_normalization, first_chunk_tokens=msg.first_chunk_tokens)
        stream = await self.engine.open_stream(options)
        ctx = Context(cid, stream, AudioEncoder(msg.encoding, msg.sample_rate), self.outbox, self.metrics)
        self.contexts[cid] = ctx
        self.metrics.contexts += 1
        self.metrics.contexts_total += 1
        self._send_control(m.Started(cid, msg.encoding, msg.sample_rate))
        if msg.text:
            ctx.text_bytes = len(msg.text.encode())
            ctx.push_text(msg.text)
        ctx.task = asyncio.create_task(self._run_context(ctx))

    async def _run_context(self, ctx: Context) -> None:
        try:
            await ctx.pump()
        finally:
            if self.contexts.get(ctx.context_id) is ctx:
                self._forget(ctx.context_id)

    def _text(self, msg: m.Text) -> None:
        ctx = self._live(msg.context_id, open_only=True)
        self._check_text_budget(msg.context_id, ctx.text_bytes, msg.text)
        ctx.text_bytes += len(msg.text.encode())
        ctx.push_text(msg.text)

    def _check_text_budget(self, cid: str, used: int, text: str) -> None:
        if used + len(text.encode()) > self.cfg.max_text_bytes_per_context:
            raise ProtocolError(errors.TEXT_TOO_LONG,
                                f"context text exceeds max_text_bytes_per_context={self.cfg.max_text_bytes_per_context}"
                                " (text dropped; end or cancel the context)", cid)

    async def _cancel(self, cid: str, notify: bool) -> None:
        ctx = self.contexts.get(cid)
        if ctx is None:
            return
        self._forget(cid)
        await ctx.cancel()
        self.metrics.contexts_cancelled_total += 1
        if notify:
            self._send_control(m.Cancelled(cid))

    def _forget(self, cid: str) -> None:
        del self.contexts[cid]
        self.metrics.contexts -= 1
        self._last_activity = time.monotonic()

    # ------------------------------------------------------------------ voices

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _voice_register(self, msg: m.VoiceRegister) -> None:
        existing = {v.voice_id for v in self.engine.list_voices()}
        if msg.voice_id in existing and not msg.overwrite:
            await self._error(errors.VOICE_EXISTS, f"voice {msg.voice_id!r} exists (set overwrite=true)")
        elif msg.voice_id not in existing and len(existing) >= self.cfg.max_voices:
            await self._error(errors.TOO_MANY_VOICES, f"at most {self.cfg.max_voices} voices")
        else:
            try:
                info = await self.engine.register_voice(msg.voice_id, msg.prompt_text, msg.audio,
                                                        overwrite=msg.overwrite)
            except EngineError as exc:
                await self._error(exc.code, exc.message)
            else:
                self._send_control(m.VoiceRegistered(_voice(info)))

    async def _voice_delete(self, msg: m.VoiceDelete) -> None:
        try:
            await self.engine.delete_voice(msg.voice_id)
        except EngineError as exc:
            await self._error(exc.code, exc.message)
        else:
            self._send_control(m.VoiceDeleted(msg.voice_id))

    # ------------------------------------------------------------------ output

    def _send_control(self, msg: m.Message) -> None:
        self.outbox.put_control(codec.encode(msg))

    async def _error(self, code: str, message: str, context_id: str | None = None) -> bool:
        """Send an ``error``; returns False (after closing with 1008) once the client has made too many."""
        self.metrics.errors_total += 1
        self._errors += 1
        self._send_control(m.Error(code, message, context_id))
        if self._errors > self.cfg.max_errors_per_connection:
            self._send_control(m.Error(errors.TOO_MANY_ERRORS,
                                       f"more than {self.cfg.max_errors_per_connection} errors; closing"))
            await self.close(CloseCode.POLICY, "too many protocol errors")
            return False
        return True


def _voice(info) -> m.Voice:
    return m.Voice(info.voice_id, info.prompt_text, float(info.prompt_seconds), info.kind)
