"""msgpack framing of protocol v1: one message = one binary WebSocket frame = one msgpack map.

Strings are msgpack str (UTF-8), audio is msgpack bin (raw bytes, never base64). Decoding checks
every field's type against the dataclass in ``protocol.messages``, rejects unknown keys, then calls
the message's ``check()`` for value ranges; every failure is a ``ProtocolError`` with a stable code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, Union

import msgpack

from protocol import errors
from protocol.messages import CLIENT_MESSAGES, SERVER_MESSAGES, Message


def encode(msg: Message) -> bytes:
    """Serialize a message to one msgpack map with its ``type`` first."""
    body = {"type": msg.TYPE}
    body.update(_to_wire(msg))
    return msgpack.packb(body, use_bin_type=True)


def decode_client(data: bytes) -> Message:
    """Parse and validate one client frame; raises ProtocolError."""
    return _decode(data, CLIENT_MESSAGES)


def decode_server(data: bytes) -> Message:
    """Parse and validate one server frame (for clients and tests); raises ProtocolError."""
    return _decode(data, SERVER_MESSAGES)


def _to_wire(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_wire(x) for x in obj]
    return obj


def _decode(data: bytes, registry: dict[str, type[Message]]) -> Message:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise errors.ProtocolError(errors.BAD_FRAME, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise errors.ProtocolError(errors.BAD_FRAME, "frame must be a msgpack map")
    context_id = raw.get("context_id") if isinstance(raw.get("context_id"), str) else None
    kind = raw.pop("type", None)
    cls = registry.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise errors.ProtocolError(errors.UNKNOWN_TYPE, f"unknown message type {kind!r}", context_id)
    try:
        msg = _build(cls, raw, kind)
    except errors.ProtocolError as exc:
        exc.context_id = exc.context_id or context_id
        raise
    msg.check()
    return msg


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise errors.ProtocolError(errors.INVALID_FIELD, f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], _hints(cls)[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise errors.ProtocolError(errors.MISSING_FIELD, f"{where}: missing field {name!r}")
    return cls(**kwargs)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(where, "an array", value)
        (inner,) = typing.get_args(hint)
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _type_error(where, "a map", value)
        return _build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(where, "a boolean", value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(where, "an integer", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(where, "a number", value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(where, "a string", value)
        return value
    if hint is bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise _type_error(where, "binary (msgpack bin)", value)
        return bytes(value)
    raise TypeError(f"unsupported field type {hint!r} at {where}")  # a bug in messages.py


def _type_error(where: str, expected: str, value: Any) -> errors.ProtocolError:
    return errors.ProtocolError(errors.INVALID_FIELD, f"{where} must be {expected}, got {type(value).__name__}")
