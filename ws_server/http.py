"""Plain-HTTP routes served from the WebSocket handshake hook: /health, /ready, /metrics and the
web demo's static files."""
from __future__ import annotations

import mimetypes
from http import HTTPStatus
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Response

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json"}


def response(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
             extra: dict[str, str] | None = None) -> Response:
    data = body.encode() if isinstance(body, str) else body
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store"), *(extra or {}).items()])
    return Response(status, HTTPStatus(status).phrase, headers, data)


def static_file(root: Path, url_path: str) -> Response:
    """The file under ``root`` named by ``url_path`` ('/' = index.html); 404 outside ``root``."""
    rel = url_path.lstrip("/") or "index.html"
    root = root.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return response(404, "not found\n")
    ctype = CONTENT_TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return response(200, target.read_bytes(), ctype)
