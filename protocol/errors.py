"""Protocol error codes (stable strings) and WebSocket close codes of protocol v1.

Every violation is answered with an ``error`` message carrying one of these codes. Only the
conditions listed under close codes end the connection.
"""
from __future__ import annotations

from enum import IntEnum

# Malformed input (recoverable: the offending frame is dropped, the connection stays open).
BAD_FRAME = "bad_frame"                  # not a msgpack map / text frame / undecodable
FRAME_TOO_LARGE = "frame_too_large"      # binary frame over the configured limit
UNKNOWN_TYPE = "unknown_type"            # ``type`` missing or not a v1 client message
MISSING_FIELD = "missing_field"          # a required field is absent
INVALID_FIELD = "invalid_field"          # wrong type, out of range or unknown value

# Context state.
UNKNOWN_CONTEXT = "unknown_context"      # names a context that is not live on this socket
CONTEXT_EXISTS = "context_exists"        # ``start`` with a context id that is still live
CONTEXT_ENDED = "context_ended"          # ``text``/``flush`` after ``end``
TOO_MANY_CONTEXTS = "too_many_contexts"  # live contexts on this socket at the limit
TEXT_TOO_LONG = "text_too_long"          # total text bytes of a context over the limit

# Voices.
VOICE_NOT_FOUND = "voice_not_found"
VOICE_EXISTS = "voice_exists"
TOO_MANY_VOICES = "too_many_voices"
INVALID_AUDIO = "invalid_audio"          # prompt audio cannot be decoded / too short / too low a rate

# Server state.
SHUTTING_DOWN = "shutting_down"          # new contexts are refused during graceful shutdown
NOT_READY = "not_ready"                  # the engine is still loading
ENGINE_ERROR = "engine_error"            # the engine failed a stream (details in the message)
INTERNAL_ERROR = "internal_error"
IDLE_TIMEOUT = "idle_timeout"            # sent just before the idle close
TOO_MANY_ERRORS = "too_many_errors"      # sent just before closing a misbehaving client

ALL_CODES = (
    BAD_FRAME, FRAME_TOO_LARGE, UNKNOWN_TYPE, MISSING_FIELD, INVALID_FIELD,
    UNKNOWN_CONTEXT, CONTEXT_EXISTS, CONTEXT_ENDED, TOO_MANY_CONTEXTS, TEXT_TOO_LONG,
    VOICE_NOT_FOUND, VOICE_EXISTS, TOO_MANY_VOICES, INVALID_AUDIO,
    SHUTTING_DOWN, NOT_READY, ENGINE_ERROR, INTERNAL_ERROR, IDLE_TIMEOUT, TOO_MANY_ERRORS,
)


class CloseCode(IntEnum):
    """WebSocket close codes the server uses."""
    NORMAL = 1000            # client closed, or server finished a graceful shutdown of this socket
    GOING_AWAY = 1001        # server shutting down (deadline passed)
    POLICY = 1008            # too many protocol errors
    TOO_BIG = 1009           # frame above the hard size cap (closed by the WebSocket layer)
    INTERNAL = 1011          # unexpected server failure
    TRY_AGAIN_LATER = 1013   # connection limit reached during the handshake race
    IDLE = 4000              # no client message and no live context for ``idle_timeout_s``


class ProtocolError(Exception):
    """A client message the server refuses; becomes an ``error`` message with ``code``."""

    def __init__(self, code: str, message: str, context_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.context_id = context_id
