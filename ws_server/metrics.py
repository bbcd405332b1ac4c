"""Prometheus text exposition of the server's counters, gauges and the time-to-first-audio histogram.

One ``Metrics`` instance per server (not module state); the engine's own numbers
(``Engine.metrics()``) are appended as gauges named ``cosy_engine_<key>``.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

TTFA_BUCKETS_S = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{b}"}} {cum}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


@dataclass
class Metrics:
    connections: int = 0                 # open WebSocket sessions
    connections_total: int = 0
    connections_refused_total: int = 0   # auth failures and over-limit
    contexts: int = 0                    # live contexts, all sockets
    contexts_total: int = 0
    contexts_cancelled_total: int = 0
    errors_total: int = 0
    underruns_total: int = 0
    audio_seconds_total: float = 0.0
    send_queue_bytes: int = 0            # bytes waiting in all per-connection send queues
    ttfa: Histogram = field(default_factory=lambda: Histogram(TTFA_BUCKETS_S))

    def render(self, engine_metrics: dict[str, float] | None = None) -> str:
        """The Prometheus text format (version 0.0.4)."""
        rows = [
            ("cosy_sessions", "gauge", "Open WebSocket sessions", self.connections),
            ("cosy_sessions_total", "counter", "WebSocket sessions accepted", self.connections_total),
            ("cosy_sessions_refused_total", "counter", "Handshakes refused (auth, limits, shutdown)",
             self.connections_refused_total),
            ("cosy_contexts", "gauge", "Live synthesis contexts", self.contexts),
            ("cosy_contexts_total", "counter", "Contexts started", self.contexts_total),
            ("cosy_contexts_cancelled_total", "counter", "Contexts cancelled", self.contexts_cancelled_total),
            ("cosy_errors_total", "counter", "Protocol error messages sent", self.errors_total),
            ("cosy_underruns_total", "counter", "Audio sends that fell behind real-time playback",
             self.underruns_total),
            ("cosy_audio_seconds_total", "counter", "Seconds of audio sent", self.audio_seconds_total),
            ("cosy_send_queue_bytes", "gauge", "Bytes queued for sending, all sessions", self.send_queue_bytes),
        ]
        out: list[str] = []
        for name, kind, help_, value in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
        out += ["# HELP cosy_time_to_first_audio_seconds First text received to first audio sent",
                "# TYPE cosy_time_to_first_audio_seconds histogram"]
        out += self.ttfa.lines("cosy_time_to_first_audio_seconds")
        for key, value in sorted((engine_metrics or {}).items()):
            name = "cosy_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            out += [f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6f}"
