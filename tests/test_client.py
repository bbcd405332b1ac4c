"""The CLI: ``python -m ws_server`` as a real process on the tiny checkpoint (SIGTERM shutdown, missing
model message) and ``python -m ws_server.client`` against it writing WAV files of the exact length
that the fixed token counts imply."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

from engine.checkpoint import DOWNLOAD_HINT
from tests.fakes import wav_bytes

REPO = Path(__file__).resolve().parent.parent
TOKENS_PER_CHAR = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ws_server.client", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def server_url(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    cfg = tmp / "server.yaml"
    cfg.write_text(f"engine: {{device: cpu, seed: 0, fixed_tokens_per_char: {TOKENS_PER_CHAR}, "
                   f"voices_dir: {tmp / 'voices'}}}\nshutdown_deadline_s: 5\n")
    port = free_port()
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ws_server", "--config", str(cfg), "--model", str(tiny_model_dir),
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "COSY_API_KEYS": "test-key",
                                                  "OMP_NUM_THREADS": "1"})  # 2-core CI: no oversubscription
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (tmp / "server.log").read_text()
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1).status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "server not ready in 120 s:\n" + (tmp / "server.log").read_text()
        time.sleep(0.3)
    yield proc, f"ws://127.0.0.1:{port}/v1/tts"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wav_frames_expected(segments: list[str], rate: int) -> int:
    return round(960 * sum(math.ceil(len(s) * TOKENS_PER_CHAR) for s in segments) * rate / 24000)


def test_client_registers_a_voice_and_writes_wavs_of_the_expected_length(server_url, tmp_path):
    _, url = server_url
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(wav_bytes(2.0, 16000))
    out = tmp_path / "a.wav"
    r = client("--url", url, "--api-key", "test-key", "--register-voice", "alice", "--prompt-wav", str(prompt),
               "--prompt-text", "Hello, this is my voice.", "--text", "Hi there. This is a test.", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "registered voice 'alice'" in r.stdout and "time to first audio:" in r.stdout
    assert "real-time factor:" in r.stdout

    # streamed from stdin at a chatbot rate, 16 kHz mu-law, JSON summary
    out16 = tmp_path / "b.wav"
    r = client("--url", url, "--api-key", "test-key", "--voice", "alice", "--stream-rate", "200",
               "--encoding", "mulaw", "--sample-rate", "16000", "--out", str(out16), "--json",
               stdin="Streaming text, fed like a chatbot. Second sentence here.")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    info = sf.info(str(out16))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "ULAW")
    assert info.frames == wav_frames_expected(summary["segments"], 16000)
    assert summary["ttfa_s"] > 0 and summary["done"]["underruns"] >= 0
    assert summary["audio_seconds"] == pytest.approx(info.frames / 16000)

    info = sf.info(str(out))
    assert (info.samplerate, info.subtype) == (24000, "PCM_16")
    assert info.frames % 960 == 0 and info.frames > 0


def test_client_reports_auth_and_protocol_errors(server_url, tmp_path):
    _, url = server_url
    r = client("--url", url, "--api-key", "wrong", "--text", "Hi.")
    assert r.returncode != 0 and "401" in r.stderr
    r = client("--url", url, "--api-key", "test-key", "--voice", "nobody", "--text", "Hi.")
    assert r.returncode == 1 and "voice_not_found" in r.stderr


def test_sigterm_shuts_down_gracefully(server_url):
    proc, _ = server_url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_missing_model_dir_names_the_download_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ws_server", "--model", str(tmp_path / "nope"), "--port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and DOWNLOAD_HINT in r.stderr
