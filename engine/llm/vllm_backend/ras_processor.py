"""The CosyVoice V1 logits processor for vLLM (RAS, eos-before-min_len mask, bistream fill forcing,
decode pacing: ``pacing.py``).

Installed engine-wide with ``logits_processors=[PROCESSOR]``; it acts only on requests whose
``SamplingParams.extra_args`` hold ``logits_math.EXTRA_KEY``. Any custom processor makes vLLM fall
back from Model Runner V2 to V1 (docs/VLLM.md measures the cost). The token history is read in
``apply`` (not ``update_state``) because async scheduling repairs placeholder ids only just before
sampling.
"""
from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from engine.llm.vllm_backend.hf_config import PROCESSOR  # noqa: F401  (the string vLLM imports)
from engine.llm.vllm_backend.logits_math import EXTRA_KEY, RowParams, apply_rows
from engine.llm.vllm_backend.pacing import DecodePacer


def _params(sp: SamplingParams) -> RowParams | None:
    extra = sp.extra_args or {}
    return RowParams.from_dict(extra[EXTRA_KEY]) if EXTRA_KEY in extra else None


class CosyVoiceLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        prm = _params(sampling_params)   # raises ValueError on bad settings
        if prm is not None and prm.ras and (sampling_params.top_k not in (0, -1)
                                            or sampling_params.top_p != 1.0
                                            or sampling_params.temperature != 1.0):
            raise ValueError("RAS requests must use temperature 1, top_k 0 and top_p 1")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[RowParams, list[int]]] = {}
        self.pacer = DecodePacer.from_config(getattr(vllm_config, "additional_config", None))

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(sp, _prompt, output_ids):
            prm = _params(sp)
            return None if prm is None else (prm, output_ids)
        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.pacer is not None:
            self.pacer.wait(len(self.rows))
        return apply_rows(logits, self.rows)
