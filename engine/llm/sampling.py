"""Speech-token sampling: upstream-exact RAS on CPU and a batched device sampler for serving.

Repetition-aware sampling (cosyvoice2.md §2.7, golden README §4.2): a nucleus draw (top-p 0.8 over at
most top-k 25 entries, the entry crossing top-p included, kept probabilities not renormalised); if
the drawn id occurs in the last ``win_size`` decoded tokens at least ``win_size * tau_r`` times, it
is masked and one id is drawn from the full distribution instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.config import SamplingConfig
from engine.llm.ids import EOS


def multinomial1(p: Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from unnormalised probabilities ``p`` [n] the way CPU ``torch.multinomial(p, 1)`` does:
    ``argmax(p / q)`` with ``q`` = n Exp(1) draws from ``generator`` (default: torch's global one)."""
    q = torch.empty_like(p).exponential_(1, generator=generator)
    return int(torch.argmax(p / q))


def nucleus_sampling(logp: Tensor, top_p: float = 0.8, top_k: int = 25,
                     generator: torch.Generator | None = None) -> int:
    """Upstream nucleus draw over ``logp`` [6564] float32; consumes len(kept) exponentials."""
    probs, order = logp.softmax(dim=0).sort(descending=True, stable=True)
    # cum is a float32 tensor after the first addition, so the comparisons are float32 (README §13.2).
    cum: float | Tensor = 0.0
    kept = 0
    while kept < len(order) and cum < top_p and kept < top_k:
        cum = cum + probs[kept]
        kept += 1
    return int(order[multinomial1(probs[:kept].clone(), generator)])


def random_sampling(logp: Tensor, generator: torch.Generator | None = None) -> int:
    """A draw from the full ``softmax(logp)``; consumes len(logp) exponentials."""
    return multinomial1(logp.softmax(dim=0), generator)


def ras_sampling(logp: Tensor, decoded: list[int], top_p: float = 0.8, top_k: int = 25, win_size: int = 10,
                 tau_r: float = 0.1, generator: torch.Generator | None = None) -> int:
    """Upstream ``ras_sampling``: ``logp`` [6564] float32 log-probs (modified in place on fallback),
    ``decoded`` the history of sampled ids. Returns the chosen id."""
    top_id = nucleus_sampling(logp, top_p, top_k, generator)
    rep_num = sum(1 for t in decoded[-win_size:] if t == top_id)
    if rep_num >= win_size * tau_r:
        logp[top_id] = -float("inf")
        top_id = random_sampling(logp, generator)
    return top_id


def sampling_ids(logp: Tensor, decoded: list[int], ignore_eos: bool, cfg: SamplingConfig,
                 generator: torch.Generator | None = None) -> int:
    """Upstream ``Qwen2LM.sampling_ids``: mask eos (6561) in place when ``ignore_eos``, then RAS."""
    if ignore_eos:
        logp[EOS] = -float("inf")
    return ras_sampling(logp, decoded, cfg.top_p, cfg.top_k, cfg.win_size, cfg.tau_r, generator)


# ---------------------------------------------------------------------------------------------------
# Batched device sampler


@dataclass
class SampleBatch:
    """Per-row inputs of one batched draw (all on the logp device).

    ``history`` [B, win_size] long: last decoded ids, left-padded with -1. ``ignore_eos`` [B] bool.
    ``ras`` [B] bool: repetition check on. ``uniform`` [B, 2] float32 in [0, 1): the row's two random
    numbers for this step (nucleus draw, fallback draw), drawn from the row's own generator.
    ``ban_stops`` [B, 3] bool or None: additionally mask the stop ids 6561, 6562, 6563 per row."""
    history: Tensor
    ignore_eos: Tensor
    ras: Tensor
    uniform: Tensor
    ban_stops: Tensor | None = None


def _inverse_cdf(p: Tensor, u: Tensor) -> Tensor:
    """Index i per row with cumsum(p)[i-1] <= u * sum(p) < cumsum(p)[i]; p [B, n] >= 0, u [B]."""
    cum = p.cumsum(dim=-1)
    target = (u * cum[:, -1])[:, None]
    idx = torch.searchsorted(cum, target, right=True)[:, 0]
    return idx.clamp_(max=p.shape[-1] - 1)


def batched_ras(logp: Tensor, inp: SampleBatch, cfg: SamplingConfig) -> Tensor:
    """RAS over a batch: logp [B, C] float32 -> ids [B] long, on logp's device, no host sync.

    Same semantics as ``sampling_ids`` (nucleus over the top-k sorted probabilities keeping entries
    until top-p is crossed; fallback to the full distribution with the repeated id masked), with
    inverse-CDF draws from ``inp.uniform`` instead of torch's multinomial."""
    logp = logp.float().masked_fill(
        inp.ignore_eos[:, None] & (torch.arange(logp.shape[-1], device=logp.device) == EOS), -float("inf"))
    if inp.ban_stops is not None:
        logp[:, EOS:EOS + 3] = logp[:, EOS:EOS + 3].masked_fill(inp.ban_stops, -float("inf"))
    probs = logp.softmax(dim=-1)
    top_p, top_i = probs.topk(min(cfg.top_k, probs.shape[-1]), dim=-1)
    before = top_p.cumsum(dim=-1) - top_p        # mass of the entries ranked above each entry
    kept = torch.where(before < cfg.top_p, top_p, torch.zeros_like(top_p))
    kept[:, 0] = top_p[:, 0]                     # the top entry is always kept
    nucleus = top_i.gather(1, _inverse_cdf(kept, inp.uniform[:, 0])[:, None])[:, 0]

    rep = (inp.history == nucleus[:, None]).sum(dim=1)
    fallback = inp.ras & (rep >= cfg.win_size * cfg.tau_r)
    masked = probs.scatter(1, nucleus[:, None], 0.0)
    # A row whose whole mass sat on the repeated id has nothing left; keep the nucleus id there.
    has_mass = masked.sum(dim=-1) > 0
    full = _inverse_cdf(masked, inp.uniform[:, 1])
    return torch.where(fallback & has_mass, full, nucleus)
