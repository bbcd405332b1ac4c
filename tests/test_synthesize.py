"""The CLI synthesizer runs the whole CPU path through TTSEngine and writes a 24 kHz WAV."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parent.parent


def test_synthesize_cli_writes_wav(tiny_model_dir, tmp_path):
    out = tmp_path / "out.wav"
    text = "Hello world. This is a second sentence."
    proc = subprocess.run(
        [sys.executable, "-m", "engine.tools.synthesize", "--model", str(tiny_model_dir), "--text", text,
         "--out", str(out), "--tokens-per-char", "0.5", "--mode", "cross_lingual", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 24000
    # every segment has exactly ceil(len * 0.5) tokens of 960 samples
    expected = sum(960 * max(1, math.ceil(len(s) * 0.5)) for s in summary["segments"])
    assert len(audio) == expected and summary["chunks"] >= 2
    assert summary["audio_s"] == round(expected / 24000, 3)
