"""vLLM ``general_plugins`` entry point (pyproject.toml): registers the CosyVoice2 model class.

vLLM calls ``register()`` in every process it starts (front end, engine core, workers), so the
spawned engine core sees the architecture too. Registration is by string (lazy import) and
idempotent.
"""
from __future__ import annotations

from engine.llm.vllm_backend.hf_config import ARCHITECTURE, MODEL_CLASS


def register() -> None:
    """Register ``CosyVoice2ForVLLM`` with vLLM's ModelRegistry (no-op if already registered)."""
    from vllm import ModelRegistry
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
