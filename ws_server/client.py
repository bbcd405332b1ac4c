"""Command-line client for protocol v1.

    python -m ws_server.client --url ws://127.0.0.1:8765/v1/tts --text "Hello there." --out hello.wav
    echo "Some text" | python -m ws_server.client --stream-rate 30 --out out.wav     # chatbot-like feed
    python -m ws_server.client --register-voice alice --prompt-wav alice.wav --prompt-text "..." --text "Hi."

Prints the time to first audio (from the first text message sent) and the real-time factor
(wall time from the first text to the last audio / audio seconds).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

from protocol import codec
from protocol import messages as m
from ws_server.audio import decode_bytes

WAV_SUBTYPE = {"pcm_s16le": "PCM_16", "pcm_f32le": "FLOAT", "mulaw": "ULAW", "alaw": "ALAW"}


@dataclass
class Result:
    audio: list[bytes] = field(default_factory=list)   # raw wire bytes of each audio message, in order
    encoding: str = "pcm_s16le"
    sample_rate: int = 24000
    segments: list[str] = field(default_factory=list)
    ttfa_s: float | None = None          # first text sent -> first audio received
    gaps_s: list[float] = field(default_factory=list)  # arrival gaps between audio messages
    wall_s: float = 0.0                  # first text sent -> last audio (or done) received
    done: m.Done | None = None
    error: m.Error | None = None
    cancelled: bool = False

    def samples(self) -> np.ndarray:
        return decode_bytes(b"".join(self.audio), self.encoding)

    @property
    def audio_seconds(self) -> float:
        return len(self.samples()) / self.sample_rate

    @property
    def rtf(self) -> float | None:
        return self.wall_s / self.audio_seconds if self.audio_seconds else None


def chunks_at_rate(text: str, chars_per_s: float, step: int = 4) -> list[tuple[float, str]]:
    """Split ``text`` into (send time offset s, piece) as a chatbot would stream it; rate 0 = one piece."""
    if chars_per_s <= 0:
        return [(0.0, text)]
    return [(i / chars_per_s, text[i:i + step]) for i in range(0, len(text), step)]


async def synthesize(ws, text: str, context_id: str = "c0", stream_rate: float = 0.0, **start) -> Result:
    """Run one context on an open socket: start, stream ``text``, end, collect until done/error."""
    res = Result(encoding=start.get("encoding", "pcm_s16le"), sample_rate=start.get("sample_rate", 24000))
    await ws.send(codec.encode(m.Start(context_id=context_id, **start)))
    t0 = time.monotonic()

    async def feed():
        for offset, piece in chunks_at_rate(text, stream_rate):
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(codec.encode(m.Text(context_id, piece)))
        await ws.send(codec.encode(m.End(context_id)))

    feeder = asyncio.create_task(feed())
    last = None
    try:
        async for frame in ws:
            msg = codec.decode_server(frame)
            if getattr(msg, "context_id", None) not in (context_id, None):
                continue
            now = time.monotonic()
            if isinstance(msg, m.Audio):
                if res.ttfa_s is None:
                    res.ttfa_s = now - t0
                if last is not None:
                    res.gaps_s.append(now - last)
                last = now
                res.audio.append(msg.audio)
            elif isinstance(msg, m.Segment):
                res.segments.append(msg.text)
            elif isinstance(msg, m.Done):
                res.done = msg
                break
            elif isinstance(msg, m.Cancelled):
                res.cancelled = True
                break
            elif isinstance(msg, m.Error):
                res.error = msg
                if msg.context_id == context_id:
                    break
        res.wall_s = (last or time.monotonic()) - t0
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
    return res


async def request(ws, msg: m.Message, reply: type[m.Message]) -> m.Message:
    """Send a voice-management message and wait for its reply (or an error)."""
    await ws.send(codec.encode(msg))
    async for frame in ws:
        out = codec.decode_server(frame)
        if isinstance(out, (reply, m.Error)):
            return out
    raise ConnectionError("connection closed before the reply")


def write_wav(path: str | Path, res: Result) -> None:
    sf.write(str(path), res.samples(), res.sample_rate, subtype=WAV_SUBTYPE[res.encoding], format="WAV")


def _read_text(a: argparse.Namespace) -> str | None:
    if a.text is not None:
        return a.text
    if a.text_file:
        return sys.stdin.read() if a.text_file == "-" else Path(a.text_file).read_text()
    if a.register_voice or a.list_voices or sys.stdin.isatty():
        return None
    return sys.stdin.read()


async def run(a: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    text = _read_text(a)
    async with connect(a.url, additional_headers=headers, max_size=None, compression=None) as ws:
        voice = a.voice
        if a.register_voice:
            reply = await request(ws, m.VoiceRegister(a.register_voice, a.prompt_text, Path(a.prompt_wav).read_bytes(),
                                                      overwrite=a.overwrite), m.VoiceRegistered)
            if isinstance(reply, m.Error):
                print(f"error: {reply.code}: {reply.message}", file=sys.stderr)
                return 1
            print(f"registered voice {reply.voice.voice_id!r} ({reply.voice.prompt_seconds:.2f} s prompt)")
            voice = voice or a.register_voice
        if a.list_voices:
            reply = await request(ws, m.VoiceList(), m.Voices)
            for v in getattr(reply, "voices", []):
                print(f"{v.voice_id}\t{v.kind}\t{v.prompt_seconds:.2f}s\t{v.prompt_text}")
        if not text:
            return 0
        start = dict(voice_id=voice, encoding=a.encoding, sample_rate=a.sample_rate, mode=a.mode,
                     instruct_text=a.instruct, speed=a.speed, input_mode=a.input_mode,
                     text_normalization=not a.no_normalization, first_chunk_tokens=a.first_chunk_tokens)
        res = await synthesize(ws, text, context_id=a.context_id, stream_rate=a.stream_rate, **start)
    if res.error is not None:
        print(f"error: {res.error.code}: {res.error.message}", file=sys.stderr)
        return 1
    if a.out:
        write_wav(a.out, res)
    if a.json:
        print(json.dumps({"ttfa_s": res.ttfa_s, "rtf": res.rtf, "audio_seconds": res.audio_seconds,
                          "messages": len(res.audio), "segments": res.segments, "sample_rate": res.sample_rate,
                          "encoding": res.encoding, "done": vars(res.done) if res.done else None}))
        return 0
    ttfa = f"{res.ttfa_s * 1000:.0f} ms" if res.ttfa_s is not None else "n/a"
    rtf = f"{res.rtf:.3f}" if res.rtf is not None else "n/a"
    print(f"time to first audio: {ttfa}")
    print(f"audio: {res.audio_seconds:.3f} s in {len(res.audio)} messages, real-time factor: {rtf}"
          + (f", wrote {a.out}" if a.out else ""))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ws_server.client", description="CosyVoice2 WebSocket TTS client")
    ap.add_argument("--url", default="ws://127.0.0.1:8765/v1/tts")
    ap.add_argument("--api-key", default=os.environ.get("COSY_API_KEY"))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to speak (default: --text-file or stdin)")
    src.add_argument("--text-file", help="file with the text ('-' = stdin)")
    ap.add_argument("--out", help="write the audio to this WAV file")
    ap.add_argument("--stream-rate", type=float, default=0.0,
                    help="feed the text at this many characters per second (0 = all at once)")
    ap.add_argument("--voice", help="voice id")
    ap.add_argument("--register-voice", metavar="NAME", help="register a voice (needs --prompt-wav, --prompt-text)")
    ap.add_argument("--prompt-wav")
    ap.add_argument("--prompt-text")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing voice of that name")
    ap.add_argument("--list-voices", action="store_true")
    ap.add_argument("--encoding", default="pcm_s16le", choices=m.ENCODINGS)
    ap.add_argument("--sample-rate", type=int, default=24000)
    ap.add_argument("--mode", default="zero_shot", choices=m.MODES)
    ap.add_argument("--instruct", default="")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--input-mode", default="segments", choices=m.INPUT_MODES)
    ap.add_argument("--no-normalization", action="store_true")
    ap.add_argument("--first-chunk-tokens", type=int, default=15)
    ap.add_argument("--context-id", default="c0")
    ap.add_argument("--json", action="store_true", help="print one JSON line of results instead of text")
    a = ap.parse_args(argv)
    if a.register_voice and not (a.prompt_wav and a.prompt_text):
        ap.error("--register-voice needs --prompt-wav and --prompt-text")
    return a


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
