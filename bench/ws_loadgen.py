"""WebSocket load generator: N concurrent clients stream chatbot-like text and measure what users see.

    # against a running server (loopback only)
    python bench/ws_loadgen.py --url ws://127.0.0.1:8765/v1/tts --clients 16 --turns 2
    # or start `python -m ws_server` on a model directory for the run (random weights need a token ratio)
    python bench/ws_loadgen.py --serve-model /tmp/tiny --tokens-per-char 1.6667 --device cpu --clients 4 \
        --label cpu-tiny --append bench/RESULTS.md

Random-weight checkpoints never stop on their own: ``--tokens-per-char`` sets the engine's
``fixed_tokens_per_char`` (5/3 = 25 tokens per second of speech at 15 characters per second, the
ratio bench/engine_bench.py uses), so 30 chars/s of text arrives twice as fast as it is spoken.

Each client opens one socket and runs ``--turns`` contexts one after another; each context streams
``--text`` at ``--rate`` characters per second (4-character messages), then ``end``. Measured per
context, at the client: time to first audio from the first text message (TTFA), the gaps between
audio messages, underruns (an audio message arriving after everything received before it would
have finished playing, playback starting at the first audio message), and the audio seconds.
Aggregate: audio seconds per wall second. The run is bounded by ``--max-seconds`` (then contexts are
cancelled) and refuses non-loopback URLs.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from websockets.asyncio.client import connect  # noqa: E402

from protocol import codec  # noqa: E402
from protocol import messages as m  # noqa: E402

DEFAULT_TEXT = ("Sure, I can help with that. The meeting is scheduled for three in the afternoon, "
                "and I will send everyone a reminder an hour before it starts.")


@dataclass
class ContextResult:
    ttfa_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    underruns: int = 0
    audio_s: float = 0.0
    ok: bool = False
    error: str | None = None


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loop_ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop_ok = host == "localhost"
    if not loop_ok:
        raise SystemExit(f"refusing {url}: the load generator only targets loopback addresses")


async def run_context(ws, cid: str, text: str, rate: float, voice: str, encoding: str, sample_rate: int,
                      input_mode: str) -> ContextResult:
    res = ContextResult()
    bytes_per_s = sample_rate * {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}[encoding]
    await ws.send(codec.encode(m.Start(cid, voice_id=voice, encoding=encoding, sample_rate=sample_rate,
                                       input_mode=input_mode)))
    t0 = time.monotonic()

    async def feed():
        for i in range(0, len(text), 4):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(codec.encode(m.Text(cid, text[i:i + 4])))
        await ws.send(codec.encode(m.End(cid)))

    feeder = asyncio.create_task(feed())
    first = last = None
    try:
        async for frame in ws:
            msg = codec.decode_server(frame)
            if getattr(msg, "context_id", None) != cid:
                continue
            now = time.monotonic()
            if isinstance(msg, m.Audio) and msg.audio:
                if first is None:
                    first, res.ttfa_s = now, now - t0
                else:
                    res.gaps_s.append(now - last)
                    if now > first + res.audio_s:
                        res.underruns += 1
                last = now
                res.audio_s += len(msg.audio) / bytes_per_s
            elif isinstance(msg, m.Done):
                res.ok = True
                break
            elif isinstance(msg, (m.Error, m.Cancelled)):
                res.error = getattr(msg, "code", "cancelled")
                break
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
    return res


async def run_client(idx: int, a: argparse.Namespace, stop_at: float) -> list[ContextResult]:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    out = []
    async with connect(a.url, additional_headers=headers, max_size=None, compression=None) as ws:
        for turn in range(a.turns):
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                break
            cid = f"c{idx}-{turn}"
            try:
                out.append(await asyncio.wait_for(
                    run_context(ws, cid, a.text, a.rate, a.voice, a.encoding, a.sample_rate, a.input_mode), remaining))
            except asyncio.TimeoutError:
                out.append(ContextResult(error="time limit"))
                await ws.send(codec.encode(m.Cancel(cid)))
    return out


async def register_voice(a: argparse.Namespace) -> None:
    import io

    import numpy as np
    import soundfile as sf
    t = np.arange(2 * 16000) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000, format="WAV")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    async with connect(a.url, additional_headers=headers, max_size=None) as ws:
        await ws.send(codec.encode(m.VoiceRegister(a.voice, "Hello, this is the load generator voice.",
                                                   buf.getvalue(), overwrite=True)))
        reply = codec.decode_server(await asyncio.wait_for(ws.recv(), 300))
        if not isinstance(reply, m.VoiceRegistered):
            raise SystemExit(f"voice registration failed: {reply}")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


async def run(a: argparse.Namespace) -> dict:
    if a.register_voice:
        await register_voice(a)
    t0 = time.monotonic()
    stop_at = t0 + a.max_seconds
    groups = await asyncio.gather(*(run_client(i, a, stop_at) for i in range(a.clients)), return_exceptions=True)
    wall = time.monotonic() - t0
    results = [r for g in groups if not isinstance(g, BaseException) for r in g]
    failures = [repr(g) for g in groups if isinstance(g, BaseException)] + [r.error for r in results if r.error]
    ttfa = [r.ttfa_s for r in results if r.ttfa_s is not None]
    gaps = [g for r in results for g in r.gaps_s]
    audio = sum(r.audio_s for r in results)
    return {
        "clients": a.clients, "contexts": len(results), "ok": sum(r.ok for r in results), "failures": failures,
        "ttfa_p50_ms": _ms(pct(ttfa, 50)), "ttfa_p95_ms": _ms(pct(ttfa, 95)),
        "ttfa_max_ms": _ms(max(ttfa, default=None)),
        "gap_p95_ms": _ms(pct(gaps, 95)), "gap_max_ms": _ms(max(gaps, default=None)),
        "underruns": sum(r.underruns for r in results),
        "contexts_with_underruns": sum(1 for r in results if r.underruns),
        "audio_s": round(audio, 2), "wall_s": round(wall, 2), "audio_s_per_wall_s": round(audio / wall, 2),
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = {"seed": 0}
    if a.tokens_per_char:
        engine["fixed_tokens_per_char"] = a.tokens_per_char
    if a.device:
        engine["device"] = a.device
    if a.engine:
        import yaml
        engine.update(yaml.safe_load(a.engine))
    cfg = Path(tempfile.mkdtemp()) / "server.yaml"
    cfg.write_text(f"engine: {engine}\nmax_connections: {a.clients + 8}\nmax_contexts_per_connection: 8\n"
                   f"idle_timeout_s: {a.max_seconds + 60}\nlog_level: WARNING\n")
    env = dict(os.environ)
    if a.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")   # the engine's worker threads run in parallel already
    proc = subprocess.Popen([sys.executable, "-m", "ws_server", "--config", str(cfg), "--model", a.serve_model,
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env)
    deadline = time.monotonic() + a.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1).status == 200:
                return proc, f"ws://127.0.0.1:{port}/v1/tts"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


def markdown_row(label: str, r: dict, a: argparse.Namespace) -> str:
    return (f"| {label} | {dt.date.today()} | {r['clients']} | {a.rate:g} | {r['ok']}/{r['contexts']} | "
            f"{r['ttfa_p50_ms']} | {r['ttfa_p95_ms']} | {r['gap_p95_ms']} | {r['gap_max_ms']} | "
            f"{r['underruns']} ({r['contexts_with_underruns']} ctx) | {r['audio_s_per_wall_s']} |")


HEADER = ("| setup | date | clients | chars/s | ok/contexts | TTFA p50 ms | TTFA p95 ms | gap p95 ms | gap max ms "
          "| underruns | audio s / wall s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8765/v1/tts")
    ap.add_argument("--serve-model", help="start `python -m ws_server` on this model directory for the run")
    ap.add_argument("--tokens-per-char", type=float, help="with --serve-model: engine fixed_tokens_per_char")
    ap.add_argument("--device", help="with --serve-model: engine device")
    ap.add_argument("--engine", help="with --serve-model: EngineConfig overrides as inline YAML, "
                    "e.g. '{dtype: bfloat16, llm_backend: vllm}'")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--api-key", default=os.environ.get("COSY_API_KEY"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=1, help="contexts per client, one after another")
    ap.add_argument("--rate", type=float, default=30.0, help="text characters per second per context")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--voice", default="loadgen")
    ap.add_argument("--no-register-voice", dest="register_voice", action="store_false",
                    help="use an existing --voice instead of registering a synthetic one")
    ap.add_argument("--encoding", default="pcm_s16le", choices=m.ENCODINGS)
    ap.add_argument("--sample-rate", type=int, default=24000)
    ap.add_argument("--input-mode", default="segments", choices=m.INPUT_MODES)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="hard bound on the whole run")
    ap.add_argument("--label", default=platform.node())
    ap.add_argument("--append", help="append a Markdown row to this file (e.g. bench/RESULTS.md)")
    a = ap.parse_args(argv)
    if not 1 <= a.clients <= 1024:
        ap.error("--clients must be 1..1024")
    proc = None
    if a.serve_model:
        proc, a.url = start_server(a)
    check_loopback(a.url)
    try:
        result = asyncio.run(run(a))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(result)
    row = markdown_row(a.label, result, a)
    print(HEADER + "\n" + row)
    if a.append:
        path = Path(a.append)
        text = path.read_text() if path.exists() else ""
        if "## WebSocket load (bench/ws_loadgen.py)" not in text:
            text += ("\n## WebSocket load (bench/ws_loadgen.py)\n\nMeasured at the client over loopback: TTFA from "
                     "the first text message; a gap is the time between audio messages; an underrun is an audio "
                     "message arriving after the audio before it would have finished playing. Random-weight runs "
                     "fix the token count with --tokens-per-char 5/3 (as bench/engine_bench.py); the text is the "
                     "default 142-character assistant reply in 4-character messages.\n\n" + HEADER + "\n")
        path.write_text(text + row + "\n")
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
