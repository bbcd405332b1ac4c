"""``CosyVoice2ForVLLM``: the CosyVoice2 LLM as a vLLM 0.26 model over unified ids (imports vLLM).

vLLM's ``vocab_size`` is the 6564 speech classes (``hf_overrides``), so ``Qwen2Model.embed_tokens``
is the speech table and sampled ids feed straight back. The text table and the two special rows sit
beside it; ``embed_input_ids`` maps the unified id space onto the three tables with static shapes.
Logits come from ``llm_decoder`` (with bias), never from the Qwen text head. Weights load straight
from the official ``llm.pt`` (``weights.renamed``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from engine.llm import ids as uid
from engine.llm.vllm_backend.unified import embed_unified
from engine.llm.vllm_backend.weights import renamed


class CosyVoice2ForVLLM(nn.Module, SupportsPP):
    # Read only llm.pt from the (side) model directory, never flow.pt / hift.pt.
    allow_patterns_overrides = ["llm.pt"]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.vocab_size != uid.NUM_SPEECH_CLASSES:
            raise ValueError(f"vocab_size must be {uid.NUM_SPEECH_CLASSES} (set by hf_overrides), "
                             f"got {config.vocab_size}")
        self.config = config
        self.text_vocab_size = int(config.text_vocab_size)
        h = config.hidden_size
        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.text_embedding = VocabParallelEmbedding(self.text_vocab_size, h,
                                                     prefix=maybe_prefix(prefix, "text_embedding"))
        self.llm_embedding = VocabParallelEmbedding(2, h, prefix=maybe_prefix(prefix, "llm_embedding"))
        self.llm_decoder = ParallelLMHead(uid.NUM_SPEECH_CLASSES, h, bias=True,
                                          prefix=maybe_prefix(prefix, "llm_decoder"))
        self.logits_processor = LogitsProcessor(uid.NUM_SPEECH_CLASSES)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unified ids [T] -> embeddings [T, H]."""
        return embed_unified(input_ids, self.model.embed_tokens, self.llm_embedding, self.text_embedding,
                             self.text_vocab_size)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None):
        if inputs_embeds is None and intermediate_tensors is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.model(None, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Final-norm hidden states [T, H] -> logits [T, 6564] (llm_decoder with bias)."""
        return self.logits_processor(self.llm_decoder, hidden_states, self.llm_decoder.bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(renamed(weights))
