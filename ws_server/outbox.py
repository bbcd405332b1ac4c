"""A connection's bounded send queue.

Stream messages (segment, audio, done) wait while the queue holds ``limit_bytes`` or more, so a slow
reader pauses only its own contexts: their pumps stop pulling from the engine. Control messages
(started, cancelled, error, voice replies) are queued without waiting, so the connection's reader
loop never blocks. A single writer task drains the queue in FIFO order.
"""
from __future__ import annotations

import asyncio
from collections import deque


class Outbox:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._items: deque[tuple[str | None, bytes]] = deque()
        self._bytes = 0
        self._closed = False
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    async def put_stream(self, context_id: str, frame: bytes) -> None:
        """Queue a stream message of ``context_id``; waits while the queue is full."""
        while self._bytes >= self.limit_bytes and not self._closed:
            self._space.clear()
            await self._space.wait()
        self._append(context_id, frame)

    def put_control(self, frame: bytes) -> None:
        """Queue a control message now, whatever the queue's size."""
        self._append(None, frame)

    def drop(self, context_id: str) -> None:
        """Remove every queued stream message of ``context_id`` (cancel: no more audio after it)."""
        self._items = deque(item for item in self._items if item[0] != context_id)
        self._bytes = sum(len(f) for _, f in self._items)
        self._update_space()

    async def get(self) -> bytes | None:
        """The next frame to send, or None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._nonempty.clear()
            await self._nonempty.wait()
        _, frame = self._items.popleft()
        self._bytes -= len(frame)
        self._update_space()
        return frame

    def close(self) -> None:
        """No more frames will be queued; queued ones are still returned by ``get``."""
        self._closed = True
        self._nonempty.set()
        self._space.set()

    def _append(self, context_id: str | None, frame: bytes) -> None:
        if self._closed:
            return
        self._items.append((context_id, frame))
        self._bytes += len(frame)
        self._nonempty.set()

    def _update_space(self) -> None:
        if self._bytes < self.limit_bytes:
            self._space.set()
