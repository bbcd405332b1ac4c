"""Load the three networks of a model directory for inference."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import ModelDir, load_strict, read_state_dict
from engine.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Models:
    config: ModelConfig
    llm: torch.nn.Module | None        # CosyVoice2LM (None when load_llm=False, e.g. vLLM serves it)
    flow: torch.nn.Module              # CausalMaskedDiffWithXvec
    hift: torch.nn.Module              # HiFTGenerator, weight norm folded
    device: torch.device
    flow_dtype: torch.dtype            # compute dtype of the flow estimator


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None -> cuda if available else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16 or float16)")
    return DTYPES[dtype]


def load_models(model_dir: str | Path, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "float32", load_llm: bool = True) -> Models:
    """Build LLM, flow and HiFT from ``model_dir`` (strict key/shape check), in eval mode on ``device``.

    Weights stay float32 except the flow estimator's, which runs in ``dtype`` (float32, bfloat16 or
    float16; the encoder and the ODE state stay float32). HiFT's weight norm is folded into plain weights once here (its modules
    cache ``g·v/||v||``), so no call recomputes it."""
    from engine.flow.flow import CausalMaskedDiffWithXvec
    from engine.hift.hift import HiFTGenerator, load_hift

    md = ModelDir(Path(model_dir))
    md.require("flow", "hift", *(["llm"] if load_llm else []))
    cfg = md.config()
    dev = resolve_device(device)
    llm = None
    if load_llm:
        from engine.llm.model import CosyVoice2LM
        llm = _build(CosyVoice2LM, cfg.llm)
        load_strict(llm, read_state_dict(md.llm), md.llm)
        llm = llm.to(dev).eval()
    flow = _build(CausalMaskedDiffWithXvec, cfg.flow)
    load_strict(flow, read_state_dict(md.flow), md.flow)
    flow = flow.to(dev).eval()
    flow_dtype = resolve_dtype(dtype)
    if flow_dtype != torch.float32:
        flow.set_estimator_dtype(flow_dtype)
    flow.decoder.estimator.fuse_projections()
    hift = _build(HiFTGenerator, cfg.hift)
    load_hift(hift, read_state_dict(md.hift), md.hift)
    hift = hift.to(dev).eval()
    hift.fold_weights()
    return Models(cfg, llm, flow, hift, dev, flow_dtype)


def _build(cls, cfg):
    """Construct on the meta device (no random-init work) and materialise empty storage to load into;
    a module with non-persistent buffers (not restored by loading) is constructed normally instead."""
    with torch.device("meta"):
        m = cls(cfg)
    persistent = set(m.state_dict())
    if any(name not in persistent for name, _ in m.named_buffers()):
        return cls(cfg)
    return m.to_empty(device="cpu")
