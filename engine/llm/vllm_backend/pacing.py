"""Decode pacing: cap vLLM's step rate while several requests decode together.

vLLM runs in its own process and decodes as fast as it can, one token per request per step, and a
decode step of the 0.5B LLM costs nearly the same at batch 4 as at batch 64. Speech needs 25 tokens
per second of audio, so beyond a few times that rate the extra steps buy nothing, while the GPU is
time-sliced between vLLM's process and the flow/HiFT worker's: every extra step is flow time lost
(H100, 64 streams: vLLM stepped ~230 times a second with ~8 requests, and flow steps took twice
their time alone). The pacer runs inside the CosyVoice logits processor (the engine core's sampling
step): while at least ``busy_rows`` requests decode, it stretches the step period to
``1 / tokens_per_s`` by sleeping. Fewer requests (a lone stream's first chunk) run unpaced.
Settings travel in vLLM's ``additional_config`` under ``CONFIG_KEY``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

CONFIG_KEY = "cosyvoice_pacing"


@dataclass
class DecodePacer:
    tokens_per_s: float
    busy_rows: int = 4
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    _last: float | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, additional_config) -> "DecodePacer | None":
        """The pacer configured in vLLM's ``additional_config`` (None: no pacing)."""
        cfg = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
        if not cfg or not cfg.get("tokens_per_s"):
            return None
        return cls(float(cfg["tokens_per_s"]), int(cfg.get("busy_rows", 4)))

    def wait(self, rows: int) -> float:
        """Called once per decode step with the number of requests in it. Sleeps so that steps of at
        least ``busy_rows`` requests start at most ``tokens_per_s`` times a second; returns the
        seconds slept."""
        now = self.clock()
        delay = 0.0
        if self._last is not None and rows >= self.busy_rows:
            delay = max(0.0, self._last + 1.0 / self.tokens_per_s - now)
            if delay > 0:
                self.sleep(delay)
                now += delay
        self._last = now
        return delay
