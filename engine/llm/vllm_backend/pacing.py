"""Decode pacing: cap vLLM's step rate while several requests decode together.

vLLM runs in its own process and decodes as fast as it can, one token per request per step, and a
decode step of the 0.5B LLM costs nearly the same at batch 4 as at batch 64. Speech needs 25 tokens
per second of audio, so beyond a few times that rate the extra steps buy nothing, while the GPU is
time-sliced between vLLM's process and the flow/HiFT worker's: every extra step is flow time lost
(H100, 64 streams: vLLM stepped ~230 times a second with ~8 requests, and flow steps took twice
their time alone). The pacer runs inside the CosyVoice logits processor (the engine core's sampling
step): while at least ``busy_rows`` requests decode, it stretches the step period to
``1 / tokens_per_s`` by sleeping.

Fewer requests decode far ahead of real time (~300 tokens/s each on an H100, 25 needed), so they
yield instead: while the flow worker computes a stream's first audio it raises a ``DecodeHold``
flag, and the pacer holds such steps until the flag drops (at most ``hold_max_s``), so the first
chunk gets the GPU alone (H100, one stream: its flow+HiFT step took 90-95 ms beside vLLM's decode
against ~50 ms alone). Settings travel in vLLM's ``additional_config`` under ``CONFIG_KEY``.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

CONFIG_KEY = "cosyvoice_pacing"


class DecodeHold:
    """A one-byte flag in a shared file, raised by the flow worker's process and read by vLLM's
    engine core process (the file outlives neither: ``create`` makes it, ``close`` removes it)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 1)

    @classmethod
    def create(cls) -> "DecodeHold":
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="cosyvoice-hold-", dir=shm)
        os.write(fd, b"\0")
        os.close(fd)
        return cls(path)

    def set(self, on: bool) -> None:
        self._map[0] = 1 if on else 0

    def is_set(self) -> bool:
        return self._map[0] != 0

    def close(self, remove: bool = False) -> None:
        self._map.close()
        if remove:
            os.unlink(self.path)


@dataclass
class DecodePacer:
    tokens_per_s: float | None
    busy_rows: int = 4
    hold: DecodeHold | None = None
    hold_max_s: float = 0.2
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    _last: float | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, additional_config) -> "DecodePacer | None":
        """The pacer configured in vLLM's ``additional_config`` (None: no pacing, no hold)."""
        cfg = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
        if not cfg or not (cfg.get("tokens_per_s") or cfg.get("hold_path")):
            return None
        hold = DecodeHold(cfg["hold_path"]) if cfg.get("hold_path") else None
        return cls(cfg.get("tokens_per_s"), int(cfg.get("busy_rows", 4)), hold)

    def wait(self, rows: int) -> float:
        """Called once per decode step with the number of requests in it. Sleeps so that steps of at
        least ``busy_rows`` requests start at most ``tokens_per_s`` times a second, and steps of
        fewer requests start only once the hold flag is down (or ``hold_max_s`` passed); returns
        the seconds slept."""
        now = self.clock()
        delay = 0.0
        if rows >= self.busy_rows:
            if self._last is not None and self.tokens_per_s:
                delay = max(0.0, self._last + 1.0 / self.tokens_per_s - now)
                if delay > 0:
                    self.sleep(delay)
        elif self.hold is not None:
            while self.hold.is_set() and delay < self.hold_max_s:
                self.sleep(0.0005)
                delay += 0.0005
        self._last = now + delay
        return delay
