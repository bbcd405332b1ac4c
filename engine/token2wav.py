"""Streaming vocoding of CosyVoice2 mel chunks: HiFT cache, cross-fade and hold-back (cosyvoice2.md §4.5, §5.2).

:func:`vocode_batch` vocodes the new mel frames of many streams in ONE batched HiFT call and applies each
stream's cache exactly as upstream ``CosyVoice2Model.token2wav`` does. :class:`Token2Wav` is the
single-stream reference (flow + HiFT, upstream call signature) used for golden parity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.hift.hift import HiFTGenerator

MEL_CACHE_LEN = 8                       # mel frames carried into the next chunk
SOURCE_CACHE_LEN = MEL_CACHE_LEN * 480  # 3840 samples of source and of held-back speech
TOKEN_MEL_RATIO = 2


def speech_window() -> np.ndarray:
    """The float64 Hamming(7680) cross-fade window: first half fades in, second half fades out."""
    return np.hamming(2 * SOURCE_CACHE_LEN)


_WINDOW = speech_window()
_WINDOW.flags.writeable = False  # a shared constant: never modified


@dataclass
class HiftCache:
    """What one stream carries from a non-final chunk to the next."""
    mel: torch.Tensor     # [80, 8] last mel frames HiFT saw (on the HiFT device)
    source: torch.Tensor  # [3840] last source samples (on the HiFT device)
    speech: np.ndarray    # float32 [3840] held-back speech, after its own cross-fade


@dataclass
class VocodeItem:
    """One stream's share of a :func:`vocode_batch` call; ``cache`` is replaced by the call."""
    mel: torch.Tensor                     # [80, M] new mel frames (after token_offset slicing)
    cache: HiftCache | None = None        # None for the first chunk of a stream
    finalize: bool = False                # last chunk: emit everything, no cache afterwards
    generator: torch.Generator | None = None  # HiFT noise; None = global RNG


def vocode_batch(hift: HiFTGenerator, items: list[VocodeItem]) -> list[np.ndarray]:
    """Vocode every item in one HiFT call; returns float32 [n_i] 24 kHz audio per item, in order.

    Per item: mel = cat(cache.mel, item.mel); HiFT with the cached source; if a cache existed, the
    first 3840 samples are cross-faded with the held-back speech (float64 math, like upstream).
    Non-final: the last 3840 samples are held back and ``item.cache`` becomes the new cache.
    Final: everything is returned and ``item.cache`` becomes None. Sample counts: 480 per new frame,
    minus 3840 for a first non-final chunk, plus 3840 for a final chunk after a cache (the held-back
    tail). A final item with no frames at all gives an empty array. Row noise comes from
    ``item.generator`` when any item has one (None rows draw from the device's default generator),
    else from the global RNG, batched in the reference order.
    """
    if not items:
        return []
    param = next(hift.parameters())
    mels, lens = [], []
    for it in items:
        mel = it.mel.to(param.device, param.dtype)  # the flow may hand over reduced-precision mels
        if it.cache is not None:
            mel = torch.cat([it.cache.mel.to(param.device, param.dtype), mel], dim=1)
        if not it.finalize and mel.shape[1] <= MEL_CACHE_LEN:
            raise ValueError(f"a non-final chunk needs more than {MEL_CACHE_LEN} mel frames, "
                             f"got {mel.shape[1]}")
        mels.append(mel)
        lens.append(mel.shape[1])
    rows = [i for i, n in enumerate(lens) if n > 0]
    if not rows:
        return [np.zeros(0, np.float32) for _ in items]
    batch = mels[0].new_zeros(len(rows), mels[0].shape[0], max(lens))
    for r, i in enumerate(rows):
        batch[r, :, :lens[i]] = mels[i]
    active = [items[i] for i in rows]
    generators = None if all(it.generator is None for it in active) else [it.generator for it in active]
    speech, source = hift.inference(batch, [lens[i] for i in rows],
                                    [None if it.cache is None else it.cache.source for it in active], generators)
    speech_np = speech.float().cpu().numpy()
    spf = hift.samples_per_frame
    row_of = {i: r for r, i in enumerate(rows)}
    out = []
    for i, it in enumerate(items):
        if i not in row_of:
            out.append(np.zeros(0, np.float32))
            continue
        r, n = row_of[i], lens[i] * spf
        s = speech_np[r, :n].copy()
        if it.cache is not None:
            head = s[:SOURCE_CACHE_LEN].astype(np.float64) * _WINDOW[:SOURCE_CACHE_LEN]
            tail = it.cache.speech.astype(np.float64) * _WINDOW[SOURCE_CACHE_LEN:]
            s[:SOURCE_CACHE_LEN] = (head + tail).astype(np.float32)
        if it.finalize:
            it.cache = None
        else:
            # clone: a view would keep the whole batch's tensors alive until the stream's next chunk
            it.cache = HiftCache(mel=mels[i][:, -MEL_CACHE_LEN:].clone(),
                                 source=source[r, 0, n - SOURCE_CACHE_LEN:n].clone(),
                                 speech=s[-SOURCE_CACHE_LEN:].copy())
            s = s[:-SOURCE_CACHE_LEN]
        out.append(s)
    return out


class Token2Wav:
    """Single-stream reference of upstream ``CosyVoice2Model.token2wav`` (one uuid's HiFT cache).

    ``flow`` must offer the upstream ``inference(token, token_len, prompt_token, prompt_token_len,
    prompt_feat, prompt_feat_len, embedding, streaming, finalize)`` returning the mel after the prompt
    (a tensor [1, 80, M] or a tuple whose first item is one)."""

    def __init__(self, flow, hift: HiFTGenerator, token_mel_ratio: int = TOKEN_MEL_RATIO):
        self.flow, self.hift, self.token_mel_ratio = flow, hift, token_mel_ratio
        self.cache: HiftCache | None = None
        self.last_flow_mel: torch.Tensor | None = None  # the flow output of the last call (diagnostics)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, token_offset: int, stream: bool = False,
                 finalize: bool = False) -> torch.Tensor:
        """token [1, N], prompt_token [1, P], prompt_feat [1, 2P, 80], embedding [1, 192] ->
        float32 speech [1, n] on CPU (24 kHz) for the tokens after ``token_offset``."""
        device = next(self.hift.parameters()).device
        i32 = lambda n: torch.tensor([n], dtype=torch.int32, device=device)  # noqa: E731
        mel = self.flow.inference(token=token.to(device, torch.int32), token_len=i32(token.shape[1]),
                                  prompt_token=prompt_token.to(device), prompt_token_len=i32(prompt_token.shape[1]),
                                  prompt_feat=prompt_feat.to(device), prompt_feat_len=i32(prompt_feat.shape[1]),
                                  embedding=embedding.to(device), streaming=stream, finalize=finalize)
        mel = mel[0] if isinstance(mel, tuple) else mel
        self.last_flow_mel = mel
        return self.vocode(mel[0, :, token_offset * self.token_mel_ratio:], finalize)

    def vocode(self, new_mel: torch.Tensor, finalize: bool) -> torch.Tensor:
        """new_mel [80, M] -> float32 speech [1, n] on CPU; updates this stream's cache."""
        item = VocodeItem(mel=new_mel, cache=self.cache, finalize=finalize)
        speech = vocode_batch(self.hift, [item])[0]
        self.cache = item.cache
        return torch.from_numpy(speech)[None]
