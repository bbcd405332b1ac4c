"""GPU test fixtures: skipped with a stated reason where CUDA or vLLM is absent.

Model directories: ``COSY_GPU_TINY_DIR`` / ``COSY_GPU_FULL_DIR`` if set, else an LLM-only random
checkpoint (llm.pt + config.json, the make_checkpoint rules) written to a temporary directory.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import pytest
import torch


def gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("vllm") is None:
        return "needs vllm==0.26.0 (not installed; see docs/VLLM.md for the H100 bundle)"
    return None


def make_llm_dir(out: Path, size: str, seed: int) -> Path:
    """llm.pt + config.json of a random checkpoint (engine.tools.make_checkpoint's rules), LLM only."""
    from engine.llm.model import CosyVoice2LM
    from engine.tools.make_checkpoint import _llm_specials, model_config, random_state_dict
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(size)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        module = CosyVoice2LM(cfg.llm)
    sd = random_state_dict(module, gen)
    _llm_specials(sd, gen)
    torch.save(sd, out / "llm.pt")
    cfg.save(out / "config.json")
    return out


def model_dir(size: str, tmp_path_factory) -> Path:
    env = os.environ.get(f"COSY_GPU_{size.upper()}_DIR")
    if env and (Path(env) / "llm.pt").exists():
        return Path(env)
    return make_llm_dir(tmp_path_factory.mktemp(f"llm-{size}"), size, seed=3)


@pytest.fixture(scope="module")
def loop():
    import logging
    lg = logging.getLogger("engine.llm.vllm_backend")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(logging.StreamHandler())
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()
