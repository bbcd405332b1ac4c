"""The math of the CosyVoice logits processor, free of vLLM (so CPU tests can check it).

Per request row the processor may (in this order):
1. force the fill token at a given output index (bistream: ``len(out_tokens) == next_fill_index``);
2. mask ids (eos before ``min_len``, or 6561/6562 in bistream's text phase);
3. replace the logits by ``log P_RAS``, the exact marginal distribution of CosyVoice's two-stage
   repetition-aware sampler (cosyvoice2.md §2.7), so vLLM's own sampler (temperature 1, no top-k/p)
   draws from it with its per-request generator.

With p = softmax(logp), K the kept nucleus (descending stable order; keep while the mass before the
entry is < top_p and fewer than top_k are kept), p_nuc = p/p(K) on K, and R ⊂ K the ids that occur
≥ win·tau times in the last ``win`` decoded tokens:

    P(x) = p_nuc(x)·[x ∈ K∖R] + Σ_{y ∈ R, y ≠ x} p_nuc(y)·p(x)/(1 − p(y))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.llm import ids as uid
from engine.tensors import upload

EXTRA_KEY = "cosyvoice"   # SamplingParams.extra_args key holding RowParams.to_dict()


@dataclass
class RowParams:
    """Per-request settings of the processor (travel in ``SamplingParams.extra_args[EXTRA_KEY]``)."""
    ras: bool = False
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    eos_min_len: int = 0                  # mask 6561 while fewer outputs than this (upstream min_len)
    mask_ids: list[int] = field(default_factory=list)   # always masked
    force_fill_at: int | None = None      # output index at which 6563 is forced
    history: list[int] = field(default_factory=list)    # decoded ids before this request's outputs

    def to_dict(self) -> dict:
        return {"ras": self.ras, "top_p": self.top_p, "top_k": self.top_k, "win_size": self.win_size,
                "tau_r": self.tau_r, "eos_min_len": self.eos_min_len, "mask_ids": list(self.mask_ids),
                "force_fill_at": self.force_fill_at, "history": list(self.history)}

    @classmethod
    def from_dict(cls, d: dict) -> "RowParams":
        p = cls(**d)
        if not (0.0 < p.top_p <= 1.0) or p.top_k < 1 or p.win_size < 1 or p.tau_r < 0:
            raise ValueError(f"bad RAS parameters {d}")
        if any(not 0 <= i < uid.NUM_SPEECH_CLASSES for i in p.mask_ids):
            raise ValueError(f"mask_ids out of range: {p.mask_ids}")
        if p.force_fill_at is not None and p.force_fill_at < 0:
            raise ValueError("force_fill_at must be >= 0")
        return p


def ras_log_probs(logp: Tensor, repeated: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """log of the RAS marginal distribution, batched.

    logp [R, V] float log-probabilities or logits (-inf allowed; at least one finite per row);
    repeated [R, V] bool (the id occurs often enough in the window); top_p [R] float; top_k [R] long.
    Returns [R, V] float32, -inf where the probability is 0. Computed in float64."""
    lp = torch.log_softmax(logp.double(), dim=-1)
    p = lp.exp()
    ps, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ps, dim=-1) - ps                       # mass strictly before each entry
    rank = torch.arange(ps.shape[-1], device=p.device).expand_as(ps)
    keep_sorted = (before < top_p[:, None]) & (rank < top_k[:, None])
    keep_sorted[:, 0] = True
    kept = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    p_kept = torch.where(kept, p, torch.zeros_like(p))
    p_nuc = p_kept / p_kept.sum(-1, keepdim=True)
    rep = kept & repeated
    # 1 - p(y) without cancellation: for the top id (the only one that can be near 1) sum the rest.
    rest_top = ps[:, 1:].sum(-1, keepdim=True)
    one_minus = torch.where(p == ps[:, :1], rest_top.expand_as(p), 1.0 - p)
    # Weight with which a repeated y redistributes its nucleus mass over all other ids.
    w = torch.where(rep & (one_minus > 0), p_nuc / one_minus.clamp_min(1e-300), torch.zeros_like(p))
    total_w = w.sum(-1, keepdim=True)
    fallback = p * (total_w - w)                                   # Σ_{y∈R, y≠x} w(y)·p(x)
    prob = torch.where(kept & ~rep, p_nuc, torch.zeros_like(p)) + fallback
    # A repeated id whose removal leaves nothing (p(y) == 1) keeps its mass: upstream would fail there.
    stuck = (rep & (one_minus <= 0)).any(-1, keepdim=True)
    prob = torch.where(stuck & rep & (one_minus <= 0), p_nuc, prob)
    return prob.log().float()


def repeated_mask(histories: list[list[int]], win_size: list[int], tau_r: list[float], vocab: int,
                  device) -> Tensor:
    """[R, vocab] bool: id occurs at least ``win·tau`` times in the last ``win`` ids of each history.

    Ids outside 0..vocab-1 (vLLM's -1 placeholders under async scheduling) are ignored."""
    rows, toks = [], []
    for i, h in enumerate(histories):
        for t in h[-win_size[i]:]:
            if 0 <= t < vocab:
                rows.append(i)
                toks.append(t)
    counts = torch.zeros(len(histories), vocab, dtype=torch.float32, device=device)
    if toks:
        ix = upload([rows, toks], torch.long, device)
        counts.index_put_((ix[0], ix[1]), torch.ones(len(toks), device=device), accumulate=True)
    # Compare exactly as upstream does: int count >= the Python float win*tau.
    thr = upload([w * t for w, t in zip(win_size, tau_r)], torch.float64, device)
    return counts.double() >= thr[:, None]


def apply_rows(logits: Tensor, rows: dict[int, tuple[RowParams, list[int]]]) -> Tensor:
    """Apply the processor in place to ``logits`` [B, V] for the rows in ``rows``.

    ``rows[i] = (params, outputs)`` where ``outputs`` are the ids this request sampled so far (its
    live output list); rows not in the dict are untouched. Returns ``logits``."""
    if not rows:
        return logits
    neg = float("-inf")
    fill_rows, mask_rows, mask_cols = [], [], []
    ras_idx, ras_hist, ras_p = [], [], []
    for i, (prm, out) in rows.items():
        n = len(out)
        if prm.force_fill_at is not None and n == prm.force_fill_at:
            fill_rows.append(i)
            continue
        cols = list(prm.mask_ids) + ([uid.EOS] if n < prm.eos_min_len else [])
        mask_rows += [i] * len(cols)
        mask_cols += cols
        if prm.ras:
            w = prm.win_size
            ras_idx.append(i)
            ras_hist.append((list(prm.history[-w:]) + list(out[-w:]))[-w:])   # the window is all RAS reads
            ras_p.append(prm)
    # One indexed write per kind for the whole batch (per-row writes cost a kernel launch each), and
    # only non-blocking uploads: this runs inside vLLM's sampling step, which overlaps the GPU.
    dev = logits.device
    if mask_rows:
        ix = upload([mask_rows, mask_cols], torch.long, dev)
        logits[ix[0], ix[1]] = neg
    if fill_rows:
        f = upload(fill_rows, torch.long, dev)
        logits[f] = neg
        logits[f, uid.FILL] = 0.0
    if ras_idx:
        idx = upload(ras_idx, torch.long, dev)
        rep = repeated_mask(ras_hist, [p.win_size for p in ras_p], [p.tau_r for p in ras_p],
                            logits.shape[-1], dev)
        top_p = upload([p.top_p for p in ras_p], torch.float64, dev)
        top_k = upload([p.top_k for p in ras_p], torch.long, dev)
        logits[idx] = ras_log_probs(logits[idx], rep, top_p, top_k).to(logits.dtype)
    return logits
