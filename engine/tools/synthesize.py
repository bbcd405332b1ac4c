"""Synthesize text to a WAV file through the streaming engine (the whole path: segmenter, LLM, batched
flow + HiFT scheduler), e.g. on CPU::

    python -m engine.tools.synthesize --model DIR --text "Hello there." --out out.wav \\
        [--voice-wav prompt.wav --prompt-text "what the prompt says" | --voice-id ID] \\
        [--mode zero_shot|cross_lingual|instruct2|sft] [--instruct "Speak slowly."] \\
        [--input-mode segments|bistream] [--tokens-per-char 1.6]

With random weights the LLM never stops on its own: ``--tokens-per-char`` fixes each segment's
speech-token count from its text length (25 tokens = 1 s of audio). Without a voice, a synthetic
harmonic tone serves as the prompt (useful only for random-weight smoke runs).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.api import SAMPLE_RATE, AudioChunk, SegmentEvent, StreamOptions


def synthetic_prompt_wav(seconds: float = 3.0, sr: int = 24000, seed: int = 0) -> bytes:
    """A voiced-sounding tone (140 Hz harmonics with vibrato, a little noise) as WAV bytes."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 3 * t)) / sr
    x = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
    x = x + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, (0.5 * x / np.abs(x).max()).astype(np.float32), sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


async def synthesize(args: argparse.Namespace) -> dict:
    """Run one stream; returns a summary dict (the audio is written to ``args.out``)."""
    from engine.engine import EngineConfig, TTSEngine

    overrides = dict(model_dir=args.model, device=args.device, dtype=args.dtype, llm_backend=args.llm,
                     seed=args.seed, fixed_tokens_per_char=args.tokens_per_char)
    cfg = EngineConfig.load(args.config, **overrides)
    engine = TTSEngine(cfg)
    t0 = time.monotonic()
    await engine.start()
    load_s = time.monotonic() - t0
    try:
        if args.voice_id:
            voice_id = args.voice_id
        else:
            audio = Path(args.voice_wav).read_bytes() if args.voice_wav else synthetic_prompt_wav()
            voice_id = "cli-voice"
            await engine.register_voice(voice_id, args.prompt_text, audio, overwrite=True)
        opts = StreamOptions(voice_id=voice_id, mode=args.mode, instruct_text=args.instruct,
                             speed=args.speed, input_mode=args.input_mode)
        stream = await engine.open_stream(opts)
        t_start = time.monotonic()
        step = max(1, args.fragment_chars)
        for i in range(0, len(args.text), step):
            stream.push_text(args.text[i:i + step])
        stream.end()
        pieces, segments, first = [], [], None
        async for ev in stream:
            if isinstance(ev, SegmentEvent):
                segments.append(ev.text)
            elif isinstance(ev, AudioChunk):
                if first is None and len(ev.samples):
                    first = time.monotonic() - t_start
                pieces.append(ev.samples)
        wall = time.monotonic() - t_start
    finally:
        await engine.close()
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    sf.write(args.out, audio, SAMPLE_RATE, subtype="PCM_16")
    seconds = len(audio) / SAMPLE_RATE
    return {"out": str(args.out), "segments": segments, "chunks": len(pieces), "audio_s": round(seconds, 3),
            "first_audio_s": None if first is None else round(first, 3), "wall_s": round(wall, 3),
            "rtf": round(wall / seconds, 3) if seconds else None, "load_s": round(load_s, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (official layout)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True, help="output WAV (24 kHz, 16-bit)")
    ap.add_argument("--voice-wav", help="prompt audio file")
    ap.add_argument("--prompt-text", default="", help="transcript of the prompt audio")
    ap.add_argument("--voice-id", help="a voice already in the voice store / spk2info.pt")
    ap.add_argument("--mode", default="zero_shot", choices=["zero_shot", "cross_lingual", "instruct2", "sft"])
    ap.add_argument("--instruct", default="", help="instruct2: the instruction text")
    ap.add_argument("--input-mode", default="segments", choices=["segments", "bistream"])
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--llm", default="torch", choices=["torch", "vllm"])
    ap.add_argument("--config", default=None, help="engine YAML (default: configs/engine.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens-per-char", "--max-tokens-per-char", dest="tokens_per_char", type=float,
                    default=None, help="fix each segment's speech-token count (random-weight checkpoints)")
    ap.add_argument("--fragment-chars", type=int, default=8, help="push the text in fragments of this size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.config is None:
        from engine.engine import DEFAULT_CONFIG
        a.config = DEFAULT_CONFIG
    if a.voice_wav and not a.prompt_text and a.mode == "zero_shot":
        ap.error("--voice-wav needs --prompt-text in zero_shot mode")
    if not a.prompt_text:
        a.prompt_text = "This is a prompt."
    return a


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    summary = asyncio.run(synthesize(args))
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
