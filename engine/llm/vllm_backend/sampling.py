"""vLLM ``SamplingParams`` for CosyVoice2 requests, built as plain dicts (testable without vLLM).

Reference sampler (cosyvoice2.md §2.5/§2.7): top-p 0.8 / top-k 25 nucleus, RAS over the last 10
tokens, no temperature, eos (6561) masked for the first ``min_len = 2·len(text)`` steps, at most
``max_len = 20·len(text)`` tokens, stop on 6561..6563.

* RAS on (needs the logits processor): the processor returns ``log P_RAS`` and masks eos before
  ``min_len`` (only 6561, as upstream); vLLM samples with temperature 1 and no top-k/top-p.
* RAS off: vLLM's own top-k 25 / top-p 0.8; ``min_tokens`` masks all three stop ids (vLLM masks
  every stop id, upstream only 6561: at worst stricter) unless the processor is installed, which then
  masks only 6561.
* greedy (tests): temperature 0 over the same masks.
"""
from __future__ import annotations

from engine.config import SamplingConfig
from engine.llm import ids as uid
from engine.llm.vllm_backend.logits_math import EXTRA_KEY, RowParams


def base_kwargs(seed: int | None, max_tokens: int, stop_ids: list[int]) -> dict:
    return {"n": 1, "seed": seed, "max_tokens": max_tokens, "stop_token_ids": list(stop_ids),
            "detokenize": False, "skip_special_tokens": False,
            # penalties stay neutral: they would bincount unified prompt ids >= 6564 (vllm-0.26.md §1)
            "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def sampler_kwargs(row: RowParams, *, ras: bool, processor: bool, greedy: bool,
                   cfg: SamplingConfig, min_tokens: int = 0, all_stops: bool = False) -> dict:
    """Temperature/top-k/top-p/min_tokens/extra_args for one request.

    ``row`` carries masks/forcing/history; ``ras`` asks for RAS; ``processor`` says whether the
    CosyVoice logits processor is installed in the engine (without it RAS, forcing and eos-only
    masking are unavailable). ``min_tokens`` is the eos-free prefix length (upstream min_len);
    ``all_stops``: every stop id is banned before it (an explicit LLMRequest.min_tokens), which is
    vLLM's own min_tokens."""
    row.ras = bool(ras and processor and not greedy)
    row.top_p, row.top_k, row.win_size, row.tau_r = cfg.top_p, cfg.top_k, cfg.win_size, cfg.tau_r
    out: dict = {}
    if greedy:
        out.update(temperature=0.0, top_k=0, top_p=1.0)
    elif row.ras:
        out.update(temperature=1.0, top_k=0, top_p=1.0)
    else:
        out.update(temperature=1.0, top_k=cfg.top_k, top_p=cfg.top_p)
    if processor:
        row.eos_min_len = 0 if all_stops else min_tokens
        out["min_tokens"] = min_tokens if all_stops else 0
        out["extra_args"] = {EXTRA_KEY: row.to_dict()}
    else:
        if row.force_fill_at is not None:
            raise ValueError("forcing the fill token needs the CosyVoice logits processor")
        out["min_tokens"] = min_tokens
        if row.mask_ids:
            out["allowed_token_ids"] = [i for i in range(uid.NUM_SPEECH_CLASSES) if i not in set(row.mask_ids)]
    return out


def request_kwargs(*, prompt_len: int, min_len: int, max_len: int, max_model_len: int, seed: int | None,
                   ras: bool, processor: bool, greedy: bool, cfg: SamplingConfig,
                   all_stops: bool = False) -> dict:
    """SamplingParams kwargs for a plain (non-bistream) request. ``max_len`` is clamped to the context;
    ``all_stops`` bans every stop id (not only eos) before ``min_len``."""
    budget = max_model_len - prompt_len
    if budget < 1:
        raise ValueError(f"prompt of {prompt_len} ids does not fit max_model_len {max_model_len}")
    max_tokens = max(1, min(max_len, budget))
    kw = base_kwargs(seed, max_tokens, list(uid.STOP_IDS))
    kw.update(sampler_kwargs(RowParams(), ras=ras, processor=processor, greedy=greedy, cfg=cfg,
                             min_tokens=min(min_len, max_tokens), all_stops=all_stops))
    return kw


def make_sampling_params(kwargs: dict):
    """vLLM SamplingParams with DELTA output from ``kwargs`` (imports vLLM)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    return SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)
