"""Shared GPU-test code: the torch reference (engine.llm.model on CUDA) and vLLM runners."""
from __future__ import annotations

import asyncio
import time

import torch

from engine.checkpoint import ModelDir, read_state_dict
from engine.llm import ids as uid
from engine.llm.bistream import BistreamState, Outcome
from engine.llm.model import CosyVoice2LM, Sequence

STREAM_MASK = (uid.EOS, uid.EOS + 1)   # text phase: 6561/6562 never chosen (upstream raises on 6562)


def start_vllm_and_reference(loop, tmp_path_factory, size: str, dtype: str, **options):
    """A started greedy, eager ``VLLMBackend`` on a random ``size`` checkpoint, and the torch
    ``CosyVoice2LM`` of the same weights as the reference (float32, or bfloat16 for other dtypes)."""
    from engine.llm.vllm_backend.backend import VLLMBackend, VLLMOptions
    from tests.gpu.conftest import model_dir
    md = model_dir(size, tmp_path_factory)
    opts = VLLMOptions(dtype=dtype, enforce_eager=True, max_model_len=2048, greedy=True,
                       config_cache_dir=str(tmp_path_factory.mktemp("vllm-side")), **options)
    backend = VLLMBackend(md, opts)
    loop.run_until_complete(backend.start())
    print(f"\n{size} vLLM start-up ({dtype}, eager): {backend.startup}")
    return backend, torch_model(md, torch.float32 if dtype == "float32" else torch.bfloat16)


def torch_model(model_dir, dtype=torch.float32) -> CosyVoice2LM:
    md = ModelDir(model_dir)
    m = CosyVoice2LM(md.config().llm)
    m.load_state_dict(read_state_dict(md.llm))
    return m.to("cuda", dtype).eval()


def torch_teacher_forced(model: CosyVoice2LM, prefix: list[int], tokens: list[int]) -> torch.Tensor:
    """logp [len(tokens), 6564] float32: prediction before each token given prefix + earlier tokens."""
    seq = Sequence(model, capacity=len(prefix) + len(tokens) + 8)
    rows = [seq.feed(prefix)[1]]
    for t in tokens[:-1]:
        rows.append(seq.feed([t])[1])
    return torch.stack(rows).float().cpu()


def torch_greedy(model: CosyVoice2LM, prefix: list[int], min_len: int, max_len: int):
    """Upstream decoding with argmax: eos masked for i < min_len, stop on 6561..6563.
    Returns (ids incl. the stop id, logp rows, top-2 margins)."""
    seq = Sequence(model, capacity=len(prefix) + max_len + 8)
    _, logp = seq.feed(prefix)
    out, rows, margins = [], [], []
    for i in range(max_len):
        lp = logp.float().clone()
        rows.append(lp.cpu())
        if i < min_len:
            lp[uid.EOS] = float("-inf")
        top2 = lp.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        t = int(lp.argmax())
        out.append(t)
        if t in uid.STOP_IDS:
            break
        _, logp = seq.feed([t])
    return out, torch.stack(rows), margins


def torch_bistream_greedy(model, prompt_text, prompt_speech, text_pieces, max_total: int):
    """The torch bistream loop (engine.llm.bistream.BistreamState) with argmax sampling, stopped
    after ``max_total`` emitted speech ids (the backends' total bound, LLMRequest.max_tokens).
    Returns (speech ids, smallest top-2 margin seen)."""
    sm = BistreamState(prompt_text, prompt_speech, strict=False)   # 6562/6563 at the end: stop, as vLLM does
    for piece in text_pieces:
        sm.push_text(piece)
    sm.end_text()
    seq = Sequence(model, capacity=4096)
    out, min_margin = [], float("inf")
    while not sm.done and len(out) < max_total:
        feed = sm.next_input()
        assert feed is not None
        _, logp = seq.feed(feed)
        if sm.fill_due():
            tok = uid.FILL
        else:
            lp = logp.float().clone()
            if sm.ignore_eos:
                lp[list(STREAM_MASK)] = float("-inf")
            top2 = lp.topk(2).values
            min_margin = min(min_margin, float(top2[0] - top2[1]))
            tok = int(lp.argmax())
        if sm.accept(tok) is Outcome.EMIT:
            out.append(tok)
    return out, min_margin


async def vllm_raw(backend, rid: str, prompt: list[int], kwargs: dict):
    """(token ids, logprob of each token) of one request through VLLMBackend.generate_raw."""
    toks, lps = [], []
    async for out in backend.generate_raw(rid, prompt, kwargs):
        o = out.outputs[0]
        toks += o.token_ids
        if o.logprobs is not None:
            for t, d in zip(o.token_ids, o.logprobs):
                lps.append(d[t].logprob)
    return toks, lps


async def text_stream(pieces, delay=0.002):
    for p in pieces:
        await asyncio.sleep(delay)
        yield p


def compare_greedy(v_toks, v_lps, ref_toks, ref_logp, margins, lp_tol, margin_tol):
    """Tokens must agree until the reference has a near tie (margin < margin_tol); log-probs of the
    compared tokens within lp_tol. Returns (compared count, max |Δ logprob|)."""
    n = 0
    max_d = 0.0
    for i, (a, b) in enumerate(zip(v_toks, ref_toks)):
        assert a == b or margins[i] < margin_tol, f"token {i}: vLLM {a} vs torch {b} (margin {margins[i]:.4f})"
        if a != b:
            break
        d = abs(v_lps[i] - float(ref_logp[i, a]))
        max_d = max(max_d, d)
        assert d < lp_tol, f"logprob {i}: vLLM {v_lps[i]:.5f} vs torch {float(ref_logp[i, a]):.5f}"
        n += 1
    else:
        assert len(v_toks) == len(ref_toks), (len(v_toks), len(ref_toks))
    return n, max_d


def now() -> float:
    return time.perf_counter()
