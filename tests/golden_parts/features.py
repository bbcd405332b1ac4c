"""Golden part ``features``: the frontend feature extractors equal the reference (README §8).

Feature functions are compared on the stored 16/24 kHz inputs (``wav_16k``/``wav_24k``, or the file
itself at its own rate). Tolerances: Whisper log-mel and flow mel 1e-4 (measured: 0, torch STFT
both sides); Kaldi fbank 5e-3 (measured <= 1.1e-3: kaldi-native-fbank's FFT vs torchaudio's, in the
log of low-energy bins). Resampling uses soxr, not torchaudio's windowed-sinc resampler: the sample
count must match exactly, and the signals agree below 6 kHz (both low-passed at 6 kHz: max abs
<= 1e-2, RMS <= 2e-3; measured 4.9e-3 / 6e-4) — above that the two resamplers' transition bands
differ (the test chirps sweep up to 0.45 x the file rate).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.frontend import features as F
from tests.golden_parts import common

KINDS = ("whisper", "fbank", "flow", "resample")


def _load(set_dir: Path) -> dict:
    return common.cases(set_dir, "features.pt")


def case_ids(set_dir: Path) -> list[str]:
    data = _load(Path(set_dir))
    return ["filters"] + [f"{s['name']}-{k}" for s in data["signals"] for k in KINDS]


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got - want).max()) if got.size else 0.0
    assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol}"


def _lowpass(x: np.ndarray, sr: int, cutoff: float) -> np.ndarray:
    spec = np.fft.rfft(x.astype(np.float64))
    spec[np.fft.rfftfreq(len(x), 1 / sr) > cutoff] = 0
    return np.fft.irfft(spec, len(x))


def check(set_dir: Path, case_id: str) -> None:
    data = _load(Path(set_dir))
    if case_id == "filters":
        _close(F.slaney_mel_filters(16000, 400, 128), _np(data["whisper_mel_filters_128"]), 1e-7, "mel_128")
        basis = F.slaney_mel_filters(24000, 1920, 80, 0.0, 8000.0)
        _close(basis[:, :641], _np(data["flow_mel_basis_80_first641"]), 1e-7, "flow mel basis")
        assert not basis[:, 641:].any(), "flow mel basis above 8 kHz must be zero"
        return
    name, kind = case_id.rsplit("-", 1)
    sig = next(s for s in data["signals"] if s["name"] == name)
    wav, sr = _np(sig["wav_file"])[0], sig["file_sample_rate"]
    wav16 = wav if sr == 16000 else _np(sig["wav_16k"])[0]
    wav24 = wav if sr == 24000 else _np(sig["wav_24k"])[0]
    if kind == "whisper":
        mel = F.whisper_log_mel(wav16)
        _close(mel[None], _np(sig["whisper_logmel_128"]), 1e-4, "whisper log-mel")
        assert mel.shape[1] == sig["whisper_len"]
    elif kind == "fbank":
        _close(F.kaldi_fbank(wav16), _np(sig["kaldi_fbank_80"]), 5e-3, "kaldi fbank")
        _close(F.campplus_input(wav16), _np(sig["kaldi_fbank_80_cmn"]), 5e-3, "fbank - mean")
    elif kind == "flow":
        mel = F.flow_prompt_mel(wav24)
        _close(mel[None], _np(sig["flow_prompt_mel_80"]), 1e-4, "flow prompt mel")
        assert mel.shape[0] == sig["flow_prompt_mel_len"]
        assert mel.shape[0] // 2 == sig["zero_shot_max_prompt_tokens"]
    elif kind == "resample":
        for target, ref in ((16000, sig["wav_16k"]), (24000, sig["wav_24k"])):
            if ref is None:
                continue
            want = _np(ref)[0]
            got = F.resample(wav, sr, target)
            assert got.shape == want.shape, f"resampled length {got.shape} != {want.shape}"
            err = _lowpass(got, target, 6000.0) - _lowpass(want, target, 6000.0)
            assert np.abs(err).max() <= 1e-2, f"resample {sr}->{target}: max {np.abs(err).max():.3g}"
            assert np.sqrt(np.mean(err ** 2)) <= 2e-3, f"resample {sr}->{target}: rms too large"
    else:
        raise AssertionError(f"unknown case {case_id}")
