"""Audio decoding, resampling and the three frontend feature extractors (no torchaudio).

* ``whisper_log_mel``: 128-bin Whisper log-mel of 16 kHz audio, input 0 of ``speech_tokenizer_v2.onnx``
  (cosyvoice2.md §1.6).
* ``kaldi_fbank`` / ``campplus_input``: 80-bin Kaldi fbank of 16 kHz audio (kaldi-native-fbank) and its
  per-utterance mean-normalized form, the CAM++ input (§1.7).
* ``flow_prompt_mel``: 80-bin log-mel of 24 kHz audio (fmax 8 kHz), the flow's prompt features (§1.8).
* ``decode_audio`` / ``resample``: any soundfile format -> float32 mono; soxr resampling.

All waveforms are float32 numpy arrays in [-1, 1], 1-D. Mel filter banks are Slaney-scale,
Slaney-normalized triangles, computed the way librosa does (float64 math, float32 result).
"""
from __future__ import annotations

import functools
import io

import numpy as np
import torch

from engine.api import EngineError

WHISPER_SR, WHISPER_N_FFT, WHISPER_HOP, WHISPER_MELS = 16000, 400, 160, 128
FLOW_SR, FLOW_N_FFT, FLOW_HOP, FLOW_MELS, FLOW_FMAX = 24000, 1920, 480, 80, 8000.0
FBANK_SR, FBANK_MELS = 16000, 80


# ---------------------------------------------------------------------------------------------
# Mel filter banks

def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@functools.lru_cache(maxsize=8)
def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                       fmax: float | None = None) -> np.ndarray:
    """Mel filter bank [n_mels, n_fft // 2 + 1] float32 (librosa ``filters.mel`` defaults: Slaney
    scale and area normalization). Cached; treat the result as read-only."""
    fmax = sr / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float32)
    for i in range(n_mels):
        rising = -ramps[i] / widths[i]
        falling = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_pts[2:n_mels + 2] - mel_pts[:n_mels]))[:, None]
    weights.setflags(write=False)
    return weights


# ---------------------------------------------------------------------------------------------
# Feature extractors

def whisper_log_mel(wav16k: np.ndarray) -> np.ndarray:
    """Whisper log-mel [128, n // 160] float32 of 16 kHz audio (no 30 s padding).

    Periodic Hann 400, hop 160, centered reflect-padded STFT without its last frame, power spectrum,
    128 Slaney mels, log10 clamped at 1e-10, floored at (max - 8), then (x + 4) / 4."""
    x = torch.from_numpy(np.ascontiguousarray(wav16k, dtype=np.float32))
    spec = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=torch.hann_window(WHISPER_N_FFT),
                      center=True, pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs() ** 2
    filters = torch.from_numpy(np.array(slaney_mel_filters(WHISPER_SR, WHISPER_N_FFT, WHISPER_MELS)))
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).numpy()


def kaldi_fbank(wav16k: np.ndarray) -> np.ndarray:
    """Kaldi log-mel fbank [T, 80] float32 of 16 kHz audio, T = 1 + (n - 400) // 160 (0 if n < 400).

    torchaudio ``compliance.kaldi.fbank`` defaults: 25 ms / 10 ms povey frames, pre-emphasis 0.97,
    DC removal, 512-point FFT, power spectrum, 80 bins from 20 Hz to Nyquist, no dither, no energy;
    samples are used as given (no int16 scaling)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = FBANK_SR
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.mel_opts.num_bins = FBANK_MELS
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(FBANK_SR, np.asarray(wav16k, dtype=np.float32).tolist())
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, FBANK_MELS), dtype=np.float32)
    return np.stack([np.asarray(fb.get_frame(i), dtype=np.float32) for i in range(n)])


def campplus_input(wav16k: np.ndarray) -> np.ndarray:
    """CAM++ input [1, T, 80] float32: ``kaldi_fbank`` minus its mean over time."""
    fb = kaldi_fbank(wav16k)
    return (fb - fb.mean(axis=0, keepdims=True))[None].astype(np.float32)


def flow_prompt_mel(wav24k: np.ndarray) -> np.ndarray:
    """Flow prompt log-mel [n // 480, 80] float32 of 24 kHz audio (Matcha ``mel_spectrogram``).

    Reflect pad 720 both sides, periodic Hann 1920, hop 480, uncentered STFT, magnitude
    sqrt(re^2 + im^2 + 1e-9), 80 Slaney mels 0..8000 Hz, natural log clamped at 1e-5."""
    x = torch.from_numpy(np.ascontiguousarray(wav24k, dtype=np.float32))[None, None]
    pad = (FLOW_N_FFT - FLOW_HOP) // 2
    x = torch.nn.functional.pad(x, (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, FLOW_N_FFT, FLOW_HOP, win_length=FLOW_N_FFT, window=torch.hann_window(FLOW_N_FFT),
                      center=False, return_complex=True)
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = torch.from_numpy(np.array(slaney_mel_filters(FLOW_SR, FLOW_N_FFT, FLOW_MELS, 0.0, FLOW_FMAX)))
    mel = torch.log(torch.clamp(basis @ mag, min=1e-5))
    return mel.T.contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# Audio I/O

def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes of any format libsndfile reads (wav, flac, ogg, mp3, ...).

    Returns (float32 mono samples, sample rate); multi-channel audio is averaged to mono.
    Raises EngineError("invalid_audio") when the bytes are not decodable audio."""
    import soundfile as sf

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise EngineError("invalid_audio", "audio is empty or not bytes")
    try:
        wav, sr = sf.read(io.BytesIO(bytes(data)), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types (LibsndfileError, RuntimeError, ...)
        raise EngineError("invalid_audio", f"cannot decode audio: {exc}") from None
    wav = wav.mean(axis=1, dtype=np.float32) if wav.shape[1] > 1 else wav[:, 0]
    if not np.all(np.isfinite(wav)):
        raise EngineError("invalid_audio", "audio contains NaN or infinite samples")
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr)


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample 1-D float32 audio from ``sr_in`` to ``sr_out`` Hz with soxr (VHQ); identity if equal.

    Differs from torchaudio's windowed-sinc resampler used upstream by ~1e-3 absolute on speech-band
    signals (both are band-limited interpolators with slightly different transition bands)."""
    wav = np.asarray(wav, dtype=np.float32)
    if sr_in == sr_out:
        return wav.copy()
    import soxr

    return np.asarray(soxr.resample(wav, sr_in, sr_out, quality="VHQ"), dtype=np.float32)
