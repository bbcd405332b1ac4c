"""The server: ``WS /v1/tts`` (protocol v1), ``GET /health``, ``/ready``, ``/metrics`` and ``/`` (web demo).

    server = TTSServer(engine, config); await server.start(); ...; await server.shutdown()

The event loop never blocks: the engine does its work off-loop, and per-chunk encoding is cheap.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from engine.api import Engine
from protocol.errors import CloseCode
from ws_server import auth
from ws_server.config import REPO, ServerConfig
from ws_server.http import response, static_file
from ws_server.metrics import Metrics
from ws_server.session import Session

log = logging.getLogger("ws_server")
WS_PATH = "/v1/tts"


class TTSServer:
    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics | None = None):
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics()
        self.sessions: set[Session] = set()
        self.draining = False
        self._server: Server | None = None
        demo = Path(config.web_demo_dir)
        self.web_root = demo if demo.is_absolute() else REPO / demo

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        return self._server.sockets[0].getsockname()[1]

    def queued_bytes(self) -> int:
        return sum(s.outbox.queued_bytes for s in self.sessions)

    async def start(self) -> None:
        """Listen; HTTP probes answer at once, ``start`` messages wait for ``engine.ready()``."""
        if not self.config.api_keys:
            log.warning("NO API KEYS CONFIGURED: the server is open to anyone who can reach %s:%s",
                        self.config.host, self.config.port)
        self._server = await serve(
            self._handle, self.config.host, self.config.port, process_request=self._http,
            max_size=2 * self.config.max_frame_bytes,  # frames above max_frame_bytes get an error; 2x closes 1009
            compression=None, ping_interval=20, ping_timeout=20, close_timeout=5)
        log.info("listening on ws://%s:%d%s", self.config.host, self.port, WS_PATH)

    async def shutdown(self, deadline_s: float | None = None) -> None:
        """Graceful stop: refuse new sockets and contexts, let live contexts finish until the deadline,
        cancel the rest (each gets ``cancelled``), close sockets with 1001 and wait for the handlers."""
        deadline_s = self.config.shutdown_deadline_s if deadline_s is None else deadline_s
        self.draining = True
        if self._server is None:
            return
        self._server.server.close()          # stop accepting TCP connections
        end = time.monotonic() + deadline_s
        while any(s.contexts for s in self.sessions) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            await s.cancel_all(notify=True)
        await asyncio.gather(*(s.close(CloseCode.GOING_AWAY, "server shutting down") for s in list(self.sessions)),
                             return_exceptions=True)
        self._server.close(close_connections=True)
        await self._server.wait_closed()

    # ------------------------------------------------------------------ HTTP and handshake

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return self._admit(request)
        if path == "/health":
            return response(200, "ok\n")
        if path == "/ready":
            ready = self.engine.ready() and not self.draining
            return response(200 if ready else 503, "ready\n" if ready else "not ready\n")
        if path == "/metrics":
            self.metrics.send_queue_bytes = self.queued_bytes()
            return response(200, self.metrics.render(self.engine.metrics()), "text/plain; version=0.0.4")
        return static_file(self.web_root, path)

    def _admit(self, request: Request) -> Response | None:
        if not auth.is_authorized(self.config.api_keys, auth.request_token(request.path, request.headers)):
            self.metrics.connections_refused_total += 1
            return response(401, "missing or invalid API key\n", extra={"WWW-Authenticate": "Bearer"})
        if self.draining:
            self.metrics.connections_refused_total += 1
            return response(503, "server is shutting down\n")
        if len(self.sessions) >= self.config.max_connections:
            self.metrics.connections_refused_total += 1
            return response(503, f"connection limit ({self.config.max_connections}) reached\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        if len(self.sessions) >= self.config.max_connections:   # raced past _admit
            self.metrics.connections_refused_total += 1
            await ws.close(CloseCode.TRY_AGAIN_LATER, "connection limit reached")
            return
        session = Session(self, ws)
        self.sessions.add(session)
        self.metrics.connections += 1
        self.metrics.connections_total += 1
        log.info("session %s opened from %s", ws.id, ws.remote_address)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.metrics.connections -= 1
            log.info("session %s closed (%s)", ws.id, ws.close_code)
