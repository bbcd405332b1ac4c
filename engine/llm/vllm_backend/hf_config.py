"""The Hugging Face view of a CosyVoice2 model directory that vLLM needs.

A CosyVoice2 release has no Qwen2 ``config.json`` for the LLM (its ``CosyVoice-BlankEN/`` folder
holds one only in the official release, and our random checkpoints hold ``ModelConfig`` JSON under
that name). vLLM reads the config and the weights from one directory, so we build a *side directory*
outside the user's model directory: a stock Qwen2 ``config.json`` generated from
``engine.config.LLMConfig`` plus a symlink to the official ``llm.pt``. ``hf_overrides`` then turns the
stock config into our architecture with a 6564-class vocabulary (docs/VLLM.md explains why).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from engine.checkpoint import CheckpointError, ModelDir
from engine.config import LLMConfig
from engine.llm import ids as uid

ARCHITECTURE = "CosyVoice2ForVLLM"
MODEL_CLASS = "engine.llm.vllm_backend.model:CosyVoice2ForVLLM"
PROCESSOR = "engine.llm.vllm_backend.ras_processor:CosyVoiceLogitsProcessor"


def qwen2_config_dict(cfg: LLMConfig, dtype: str = "bfloat16") -> dict:
    """A stock ``Qwen2ForCausalLM`` config (text vocabulary, as ``CosyVoice-BlankEN`` has it).

    bos/eos ids are dropped: stopping uses only the speech stop ids (6561..6563)."""
    q = cfg.llm
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": q.hidden_size,
        "intermediate_size": q.intermediate_size,
        "num_hidden_layers": q.num_hidden_layers,
        "num_attention_heads": q.num_attention_heads,
        "num_key_value_heads": q.num_key_value_heads,
        "head_dim": q.head_dim,
        "hidden_act": q.hidden_act,
        "rms_norm_eps": q.rms_norm_eps,
        "rope_theta": q.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": q.rope_theta},
        "max_position_embeddings": q.max_position_embeddings,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": q.num_hidden_layers,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "vocab_size": q.vocab_size,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def hf_overrides(cfg: LLMConfig) -> dict:
    """Overrides that make vLLM build ``CosyVoice2ForVLLM`` whose vocabulary is the 6564 speech classes.

    ``vocab_size`` sizes vLLM's embed_tokens (= the speech table), logits, sampler masks and penalty
    bins; the text table's size travels as ``text_vocab_size``."""
    return {
        "architectures": [ARCHITECTURE],
        "vocab_size": uid.NUM_SPEECH_CLASSES,
        "text_vocab_size": cfg.llm.vocab_size,
        "tie_word_embeddings": False,
    }


def side_dir(model_dir: str | Path, cache_root: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Create (idempotently) and return the side directory vLLM loads as its ``model``.

    It holds ``config.json`` (``qwen2_config_dict``) and ``llm.pt`` (a symlink to the model
    directory's file). Its name hashes the llm.pt path, size and mtime and the config, so a changed
    checkpoint never reuses a stale directory. The user's model directory is never written."""
    md = ModelDir(Path(model_dir).resolve())
    md.require("llm")
    cfg = md.config().llm
    conf = qwen2_config_dict(cfg, dtype)
    st = md.llm.stat()
    key = json.dumps([str(md.llm), st.st_size, st.st_mtime_ns, conf], sort_keys=True)
    root = Path(cache_root or os.environ.get("COSY_VLLM_DIR") or Path.home() / ".cache" / "cosyvoice-ws" / "vllm")
    out = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    link = out / "llm.pt"
    if link.is_symlink() or link.exists():
        if link.resolve() != md.llm:
            raise CheckpointError(f"{link} points to {link.resolve()}, expected {md.llm}")
    else:
        link.symlink_to(md.llm)
    return out
