"""Prompt processing: (prompt text, prompt audio) -> ``VoicePrompt`` (cosyvoice2.md §1.6-1.9).

Audio bytes of any soundfile format and any rate >= 16 kHz are decoded, down-mixed to mono and
resampled with soxr to 16 kHz (speech tokenizer, CAM++) and 24 kHz (flow prompt mel). The prompt
text is validated, normalized (``split=False``) and tokenized. Zero-shot alignment: the prompt keeps
``P = min(frames // 2, #tokens)`` speech tokens and exactly ``2P`` mel frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.api import EngineError
from engine.checkpoint import ModelDir
from engine.frontend import features as F
from engine.frontend.text import TextFrontend, validate_text

TOKEN_RATE_HZ = 25


@dataclass
class PromptLimits:
    """What a prompt must satisfy; violations raise EngineError with the code in brackets."""
    min_seconds: float = 1.0            # [audio_too_short]
    max_seconds: float = 30.0           # [audio_too_long]; the speech tokenizer's hard limit
    min_sample_rate: int = 16000        # [sample_rate_too_low]
    silence_peak: float = 1e-3          # [silent_audio] if max |x| is below this (about -60 dBFS)
    max_text_chars: int = 1000          # [text_too_long]


@dataclass
class VoicePrompt:
    """Everything synthesis needs from a voice (the official spk2info entry, cosyvoice2.md §7.2).

    ``speech_tokens`` int64 [P]; ``speech_feat`` float32 [2P, 80] (24 kHz, 50 frames/s);
    ``embedding`` float32 [192] (CAM++ x-vector, used as both LLM and flow embedding).
    ``kind == "sft"`` voices have only an embedding (P = 0, empty prompt text)."""
    prompt_text: str
    prompt_text_ids: list[int]
    speech_tokens: torch.Tensor
    speech_feat: torch.Tensor
    embedding: torch.Tensor
    kind: str = "zero_shot"
    extra: dict = field(default_factory=dict)

    @property
    def prompt_seconds(self) -> float:
        """Duration of the aligned prompt (P tokens at 25 Hz)."""
        return int(self.speech_tokens.numel()) / TOKEN_RATE_HZ

    def equals(self, other: "VoicePrompt") -> bool:
        """Exact equality of every field (tensors compared by value, dtype and shape)."""
        return (self.prompt_text == other.prompt_text and self.prompt_text_ids == other.prompt_text_ids
                and self.kind == other.kind
                and all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                        for a, b in ((self.speech_tokens, other.speech_tokens),
                                     (self.speech_feat, other.speech_feat),
                                     (self.embedding, other.embedding))))


def _session(path: Path, device: str, single_thread: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if single_thread:
        opts.intra_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = str(device).partition(":")[2] or "0"
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index)}))
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class PromptProcessor:
    """Builds ``VoicePrompt``s with the model directory's ONNX models and tokenizer.

    ``device``: "cpu" or "cuda[:i]"; the speech tokenizer uses onnxruntime's CUDA provider when
    both requested and installed, CAM++ always runs on CPU with one thread (as upstream).
    ``text_frontend``: a ``TextFrontend`` to share (built from the model's tokenizer if omitted).
    Thread-safe (onnxruntime sessions allow concurrent ``run``)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", text_frontend: TextFrontend | None = None,
                 limits: PromptLimits | None = None):
        md = ModelDir(Path(model_dir))
        md.require("campplus", "speech_tokenizer")
        if text_frontend is None:
            from engine.frontend.tokenizer import CosyVoice2Tokenizer
            md.require("tokenizer_dir")
            text_frontend = TextFrontend(CosyVoice2Tokenizer(md.tokenizer_dir))
        self.text_frontend = text_frontend
        self.limits = limits or PromptLimits()
        self._campplus = _session(md.campplus, "cpu", single_thread=True)
        self._tokenizer = _session(md.speech_tokenizer, device, single_thread=False)

    # -- individual steps (public for tests and the streaming engine) --------------------------

    def load_audio(self, audio: bytes) -> tuple[np.ndarray, int]:
        """Decode and validate prompt audio; returns (float32 mono, sample rate)."""
        lim = self.limits
        wav, sr = F.decode_audio(audio)
        if wav.size == 0:
            raise EngineError("invalid_audio", "audio has no samples")
        if sr < lim.min_sample_rate:
            raise EngineError("sample_rate_too_low", f"sample rate {sr} Hz is below {lim.min_sample_rate} Hz")
        seconds = wav.size / sr
        if seconds < lim.min_seconds:
            raise EngineError("audio_too_short",
                              f"prompt audio is {seconds:.2f} s; at least {lim.min_seconds} s needed")
        if seconds > lim.max_seconds:
            raise EngineError("audio_too_long",
                              f"prompt audio is {seconds:.2f} s; at most {lim.max_seconds} s allowed")
        if float(np.abs(wav).max()) < lim.silence_peak:
            raise EngineError("silent_audio", "prompt audio is silent")
        return wav, sr

    def speech_tokens(self, wav16k: np.ndarray) -> np.ndarray:
        """Speech tokens int64 [T'] (25 Hz) of 16 kHz audio via ``speech_tokenizer_v2.onnx``."""
        mel = F.whisper_log_mel(wav16k)[None]
        inputs = self._tokenizer.get_inputs()
        out = self._tokenizer.run(None, {inputs[0].name: mel,
                                         inputs[1].name: np.array([mel.shape[2]], dtype=np.int32)})[0]
        return np.asarray(out).reshape(-1).astype(np.int64)

    def embedding(self, wav16k: np.ndarray) -> np.ndarray:
        """CAM++ x-vector float32 [192] of 16 kHz audio."""
        feats = F.campplus_input(wav16k)
        out = self._campplus.run(None, {self._campplus.get_inputs()[0].name: feats})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def prompt_text(self, text: str | bytes) -> tuple[str, list[int]]:
        """Validate, normalize (split=False) and tokenize a prompt text -> (text, ids)."""
        text = validate_text(text, self.limits.max_text_chars, "prompt text")
        return text, self.text_frontend.tokenizer.encode(self.text_frontend.normalize(text, split=False))

    # -- the whole thing ------------------------------------------------------------------------

    def process(self, prompt_text: str | bytes, audio: bytes) -> VoicePrompt:
        """(prompt text, audio bytes) -> aligned ``VoicePrompt``; raises EngineError on bad input."""
        text, ids = self.prompt_text(prompt_text)
        wav, sr = self.load_audio(audio)
        wav16 = F.resample(wav, sr, 16000)
        wav24 = F.resample(wav, sr, 24000)
        tokens = self.speech_tokens(wav16)
        emb = self.embedding(wav16)
        feat = F.flow_prompt_mel(wav24)
        n = min(feat.shape[0] // 2, tokens.shape[0])
        if n == 0:
            raise EngineError("audio_too_short", "prompt audio yields no speech tokens")
        return VoicePrompt(prompt_text=text, prompt_text_ids=ids,
                           speech_tokens=torch.from_numpy(tokens[:n].copy()),
                           speech_feat=torch.from_numpy(np.ascontiguousarray(feat[:2 * n])),
                           embedding=torch.from_numpy(emb.copy()))

