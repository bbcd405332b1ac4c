"""``CosyVoice2LM``: upstream ``Qwen2LM`` for inference (state-dict keys exactly those of ``llm.pt``).

Inputs are unified ids (``engine.llm.ids``): speech 0..6563 -> ``speech_embedding``, 6564 sos and
6565 task_id -> ``llm_embedding`` rows 0/1, 6566 + t -> the Qwen ``embed_tokens`` row t. Outputs are
``log_softmax(llm_decoder(h))`` over the 6564 speech classes, with ``h`` the backbone's hidden state
after its final RMSNorm (cosyvoice2.md §2.4).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.config import LLMConfig
from engine.llm import ids as uid
from engine.llm.qwen2 import Batch, KVCache, Qwen2Encoder


class CosyVoice2LM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.llm_input_size != cfg.llm.hidden_size or cfg.llm_output_size != cfg.llm.hidden_size:
            raise ValueError("llm_input_size/llm_output_size must equal the backbone hidden_size")
        if cfg.num_speech_classes != uid.NUM_SPEECH_CLASSES:
            raise ValueError(f"speech_token_size {cfg.speech_token_size} does not match the unified id "
                             f"scheme ({uid.NUM_SPEECH_CLASSES - 3})")
        self.cfg = cfg
        h = cfg.llm_input_size
        self.llm_embedding = nn.Embedding(2, h)
        self.llm = Qwen2Encoder(cfg.llm)
        self.llm_decoder = nn.Linear(cfg.llm_output_size, cfg.num_speech_classes, bias=True)
        self.speech_embedding = nn.Embedding(cfg.num_speech_classes, h)

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the same Parameter as ``embed_tokens.weight`` (as released)."""
        if self.cfg.llm.tie_word_embeddings:
            self.llm.model.lm_head.weight = self.backbone.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # to_empty()/to() may replace each Parameter separately, which would untie (and duplicate,
        # 545 MB at full size) the unused lm_head; re-tie after every conversion.
        out = super()._apply(fn, recurse)
        self.tie_weights()
        return out

    @property
    def backbone(self):
        return self.llm.model.model

    def embed(self, ids: Tensor) -> Tensor:
        """Unified ids (any shape, long) -> embeddings [..., H]; no data-dependent shapes."""
        speech = self.speech_embedding(ids.clamp(0, uid.NUM_SPEECH_CLASSES - 1))
        special = self.llm_embedding((ids - uid.SOS_ID).clamp(0, 1))
        text = self.backbone.embed_tokens((ids - uid.TEXT_OFFSET).clamp(0, self.cfg.llm.vocab_size - 1))
        out = torch.where((ids < uid.SOS_ID)[..., None], speech, special)
        return torch.where((ids >= uid.TEXT_OFFSET)[..., None], text, out)

    def new_cache(self, slots: int, capacity: int, device=None, dtype=None) -> KVCache:
        """An empty KV cache for ``slots`` sequences of up to ``capacity`` positions each."""
        p = self.llm_decoder.weight
        return KVCache.allocate(self.cfg.llm, slots, capacity, device or p.device, dtype or p.dtype)

    def forward(self, ids: Tensor, cache: KVCache, batch: Batch, last: Tensor) -> tuple[Tensor, Tensor]:
        """One batched step.

        ids [B, T] long unified ids (right-padded with any valid id), ``batch`` says where each row
        reads/writes the cache, ``last`` [B] long = index in T of each row's last real token.
        Returns (hidden [B, H] after the final norm at ``last``, logp float32 [B, 6564])."""
        x = self.embed(ids)
        h = self.backbone(x, cache, batch)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]
        logp = self.llm_decoder(h_last).float().log_softmax(dim=-1)
        return h_last, logp


def load_llm(cfg: LLMConfig, path, device="cpu", dtype: torch.dtype | None = None) -> CosyVoice2LM:
    """Build ``CosyVoice2LM`` without random init and load ``llm.pt`` strictly (CheckpointError on
    any missing/unexpected/misshapen key). Returns the model in eval mode on ``device``/``dtype``."""
    from engine.checkpoint import load_strict, read_state_dict

    with torch.device("meta"):
        model = CosyVoice2LM(cfg)
    model = model.to_empty(device="cpu")
    load_strict(model, read_state_dict(path), path)
    return model.to(device=device, dtype=dtype).eval()


class Sequence:
    """Single-sequence driver over a private cache (tests, parity tools, CPU reference runs)."""

    def __init__(self, model: CosyVoice2LM, capacity: int = 256):
        self.model = model
        self.cache = model.new_cache(1, capacity)
        self.length = 0

    @torch.inference_mode()
    def feed(self, unified_ids: list[int]) -> tuple[Tensor, Tensor]:
        """Feed ids after those already fed -> (hidden [H], logp [6564]) at the last one."""
        n = len(unified_ids)
        if self.length + n > self.cache.capacity:
            self.cache = self.cache.grow(1, max(2 * self.cache.capacity, self.length + n))
        dev = self.cache.k.device
        ids = torch.tensor([unified_ids], dtype=torch.long, device=dev)
        pos = torch.arange(self.length, self.length + n, device=dev)[None]
        batch = Batch(torch.zeros(1, dtype=torch.long, device=dev), pos, self.length + n, True)
        h, logp = self.model(ids, self.cache, batch, torch.tensor([n - 1], device=dev))
        self.length += n
        return h[0], logp[0]
