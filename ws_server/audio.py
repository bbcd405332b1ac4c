"""Per-stream conversion of the engine's float32 24 kHz audio to the requested wire format.

Formats: pcm_s16le, pcm_f32le (little-endian), mulaw and alaw (ITU-T G.711, one byte a sample,
computed exactly from the 16-bit PCM value as the reference G.711 encoder does). Resampling uses a
streaming soxr resampler per stream, so chunk joins are seamless and the total output length is
round(n_in * rate / 24000) samples once ``final=True`` has been passed.
"""
from __future__ import annotations

import numpy as np
import soxr

ENGINE_RATE = 24000
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}


def float_to_s16(x: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16: clip(round(x * 32768), -32768, 32767)."""
    return np.clip(np.rint(x.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


_SEG_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


def lin2ulaw(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> G.711 mu-law bytes (uint8), exact: bias 0x84 on the 14-bit magnitude."""
    v = pcm.astype(np.int32) >> 2                       # 14-bit
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v) + (0x84 >> 2), 0x1FFF)   # |v| + bias, clipped to 13 bits
    seg = np.searchsorted(_SEG_ENDS, mag)               # first segment whose end >= mag
    out = (seg << 4) | ((mag >> (seg + 1)) & 0x0F)
    out = np.where(seg >= 8, 0x7F, out)
    return (out ^ mask).astype(np.uint8)


def lin2alaw(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> G.711 A-law bytes (uint8), exact: 13-bit magnitude, even bits inverted (0x55)."""
    v = pcm.astype(np.int32) >> 3                       # 13-bit
    mask = np.where(v >= 0, 0xD5, 0x55)
    mag = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_SEG_ENDS[:-1] >> 1, mag)     # segment ends 0x1F, 0x3F, ..., 0xFFF
    mant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    out = np.where(seg >= 8, 0x7F, (seg << 4) | mant)
    return (out ^ mask).astype(np.uint8)


def ulaw2lin(codes: np.ndarray) -> np.ndarray:
    """G.711 mu-law bytes -> int16 PCM (the standard expansion)."""
    u = ~codes.astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def alaw2lin(codes: np.ndarray) -> np.ndarray:
    """G.711 A-law bytes -> int16 PCM (the standard expansion)."""
    a = codes.astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return np.where(a & 0x80, t, -t).astype(np.int16)


class AudioEncoder:
    """Converts one stream's chunks; keep one instance per context (it holds resampler state)."""

    def __init__(self, encoding: str, sample_rate: int):
        if encoding not in BYTES_PER_SAMPLE:
            raise ValueError(f"unknown encoding {encoding!r}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._resampler = (soxr.ResampleStream(ENGINE_RATE, sample_rate, 1, dtype="float32", quality="HQ")
                           if sample_rate != ENGINE_RATE else None)

    def encode(self, samples: np.ndarray, final: bool = False) -> bytes:
        """float32 mono samples at 24 kHz -> bytes in this encoder's format and rate.

        ``final=True`` flushes the resampler's tail; call it once, with the last chunk."""
        x = np.ascontiguousarray(samples, dtype=np.float32)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=final)
        if self.encoding == "pcm_f32le":
            return np.clip(x, -1.0, 1.0).astype("<f4").tobytes()
        pcm = float_to_s16(x)
        if self.encoding == "pcm_s16le":
            return pcm.astype("<i2").tobytes()
        if self.encoding == "mulaw":
            return lin2ulaw(pcm).tobytes()
        return lin2alaw(pcm).tobytes()


def decode_bytes(data: bytes, encoding: str) -> np.ndarray:
    """Wire bytes -> float32 samples in [-1, 1] (for clients and tests)."""
    if encoding == "pcm_f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if encoding == "pcm_s16le":
        pcm = np.frombuffer(data, dtype="<i2")
    elif encoding == "mulaw":
        pcm = ulaw2lin(np.frombuffer(data, dtype=np.uint8))
    elif encoding == "alaw":
        pcm = alaw2lin(np.frombuffer(data, dtype=np.uint8))
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return pcm.astype(np.float32) / 32768.0
