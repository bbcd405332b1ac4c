"""API-key check for the WebSocket handshake: ``Authorization: Bearer KEY`` or ``?token=KEY``."""
from __future__ import annotations

import hmac
from urllib.parse import parse_qs, urlsplit


def request_token(path: str, headers) -> str | None:
    """The key a request presents: the Bearer header wins over the ``token`` query parameter."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    tokens = parse_qs(urlsplit(path).query).get("token")
    return tokens[0] if tokens else None


def is_authorized(keys: list[str], token: str | None) -> bool:
    """True if no keys are configured (open server) or ``token`` equals one of them.

    Every key is compared in constant time, so timing reveals neither the key nor which one matched."""
    if not keys:
        return True
    presented = (token or "").encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key.encode())
    return ok
