"""Audio decoding, resampling, feature shapes and the ONNX stand-ins (golden parity: golden_parts)."""
from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf

from engine.api import EngineError
from engine.frontend import features as F
from engine.tools.onnx_standins import write_campplus, write_speech_tokenizer


def _encode(wav: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _tone(sr: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", None), ("OGG", "VORBIS")])
def test_decode_formats(fmt, subtype):
    wav, sr = F.decode_audio(_encode(_tone(22050, 0.5), 22050, fmt, subtype))
    assert sr == 22050 and wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 11025) <= 1200          # vorbis may pad a little
    assert 0.25 < np.abs(wav).max() < 0.35


def test_decode_downmixes_to_mono():
    stereo = _tone(16000, 0.5, channels=2)
    wav, _ = F.decode_audio(_encode(stereo, 16000, "WAV", "FLOAT"))
    np.testing.assert_allclose(wav, stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("data", [b"", b"not audio at all", b"RIFF\x00\x00\x00\x00WAVEfmt "])
def test_decode_rejects_garbage(data):
    with pytest.raises(EngineError) as e:
        F.decode_audio(data)
    assert e.value.code == "invalid_audio"


@pytest.mark.parametrize("sr_in,sr_out", [(24000, 16000), (16000, 24000), (44100, 16000), (48000, 24000)])
def test_resample_length_and_band(sr_in, sr_out):
    x = _tone(sr_in, 1.0)
    y = F.resample(x, sr_in, sr_out)
    assert y.dtype == np.float32 and len(y) == int(np.ceil(len(x) * sr_out / sr_in))
    ref = (0.3 * np.sin(2 * np.pi * 220 * np.arange(len(y)) / sr_out)).astype(np.float32)
    assert np.abs(y - ref)[200:-200].max() < 1e-3       # a 220 Hz tone passes unchanged
    assert F.resample(x, sr_in, sr_in) is not x and np.array_equal(F.resample(x, sr_in, sr_in), x)


def test_feature_shapes():
    w16, w24 = _tone(16000, 1.0), _tone(24000, 1.0)
    assert F.whisper_log_mel(w16).shape == (128, 100)
    assert F.kaldi_fbank(w16).shape == (98, 80)
    cmn = F.campplus_input(w16)
    assert cmn.shape == (1, 98, 80) and np.abs(cmn.mean(axis=1)).max() < 1e-4
    assert F.flow_prompt_mel(w24).shape == (50, 80)
    assert F.kaldi_fbank(np.zeros(100, np.float32)).shape == (0, 80)


def test_onnx_standins(tmp_path):
    cp = ort.InferenceSession(str(write_campplus(tmp_path / "c.onnx", seed=3)), providers=["CPUExecutionProvider"])
    st = ort.InferenceSession(str(write_speech_tokenizer(tmp_path / "s.onnx", seed=3)),
                              providers=["CPUExecutionProvider"])
    assert [i.shape for i in cp.get_inputs()] == [[1, "T", 80]]
    feats = F.campplus_input(_tone(16000, 1.0))
    emb = cp.run(None, {cp.get_inputs()[0].name: feats})[0]
    assert emb.shape == (1, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()
    rng = np.random.default_rng(0)
    for t in (1, 2, 3, 4, 5, 99, 100, 101, 3000):
        mel = rng.standard_normal((1, 128, t)).astype(np.float32)
        out = st.run(None, {st.get_inputs()[0].name: mel, st.get_inputs()[1].name: np.array([t], np.int32)})[0]
        assert out.shape == (1, -(-(-(-t // 2)) // 2)) and out.dtype == np.int64
        assert out.min() >= 0 and out.max() <= 6560
        again = st.run(None, {st.get_inputs()[0].name: mel, st.get_inputs()[1].name: np.array([t], np.int32)})[0]
        assert np.array_equal(out, again)
    mel = F.whisper_log_mel(_tone(16000, 3.0))[None]
    toks = st.run(None, {st.get_inputs()[0].name: mel, st.get_inputs()[1].name: np.array([300], np.int32)})[0]
    assert len(np.unique(toks)) > 1
    other = ort.InferenceSession(str(write_speech_tokenizer(tmp_path / "s2.onnx", seed=4)),
                                 providers=["CPUExecutionProvider"])
    rnd = rng.standard_normal((1, 128, 200)).astype(np.float32)
    a = st.run(None, {"feats": rnd, "feats_length": np.array([200], np.int32)})[0]
    b = other.run(None, {"feats": rnd, "feats_length": np.array([200], np.int32)})[0]
    assert not np.array_equal(a, b)                      # the seed matters
