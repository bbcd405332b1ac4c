"""The asyncio TorchLLMBackend on the golden tiny-s1 LLM weights (CPU)."""
from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.llm.backend import LLMRequest
from engine.llm.model import load_llm
from engine.llm.torch_backend import TorchLLMBackend

REPO = Path(__file__).resolve().parent.parent


def _tiny_set() -> Path:
    roots = (os.environ.get("COSY_GOLDEN_DIRS") or str(REPO.parent / "shared" / "golden")).split(":")
    for root in filter(None, roots):
        for d in (Path(root), Path(root) / "tiny-s1"):
            if (d / "model" / "llm.pt").exists() and d.name == "tiny-s1":
                return d
    pytest.fail("golden set tiny-s1 not found (COSY_GOLDEN_DIRS or ../shared/golden)")


@functools.lru_cache(maxsize=1)
def _model():
    d = _tiny_set()
    return load_llm(ModelConfig.load(d / "model" / "config.json").llm, d / "model" / "llm.pt")


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def _collect(it) -> list[int]:
    out = []
    async for toks in it:
        out.extend(toks)
    return out


def _requests() -> list[LLMRequest]:
    g = torch.Generator().manual_seed(5)
    rand = lambda n, hi: torch.randint(0, hi, (n,), generator=g).tolist()  # noqa: E731
    return [
        LLMRequest("zs", text_ids=rand(4, 511), prompt_text_ids=rand(7, 511),
                   prompt_speech_tokens=rand(23, 6561), seed=1),
        LLMRequest("xl", text_ids=rand(3, 511), seed=2),
        LLMRequest("ins", text_ids=rand(5, 511), prompt_text_ids=rand(4, 511) + [511], seed=3,
                   min_tokens=4, max_tokens=12),
    ]


async def _drained(b, polls: int = 100) -> bool:
    """Whether the backend holds no request within ``polls`` × 10 ms (the worker applies aborts
    at its next step)."""
    for _ in range(polls):
        if b.active_requests() == 0:
            return True
        await asyncio.sleep(0.01)
    return False


async def _with_backend(fn, **kw):
    backend = TorchLLMBackend(_model(), "cpu", **kw)
    await backend.start()
    try:
        return await fn(backend)
    finally:
        await backend.close()


def test_concurrent_requests_valid_and_batch_independent():
    reqs = _requests()

    async def together(b):
        return await asyncio.gather(*(_collect(b.generate(r)) for r in reqs))

    async def alone(b):
        return [await _collect(b.generate(r)) for r in reqs]

    outs = _run(_with_backend(together))
    for r, out in zip(reqs, outs):
        lo, hi = r.length_bounds()
        assert lo <= len(out) <= hi, (r.request_id, len(out), lo, hi)
        assert all(0 <= t < 6561 for t in out), r.request_id
    # Each request samples from its own seeded generator: same tokens with or without company.
    assert _run(_with_backend(alone)) == outs
    # ...and a different seed gives a different sequence.
    other = LLMRequest(**{**reqs[1].__dict__, "seed": 99})
    assert _run(_with_backend(lambda b: _collect(b.generate(other)))) != outs[1]


def test_max_batch_queues_extra_requests():
    reqs = _requests()
    outs = _run(_with_backend(lambda b: asyncio.gather(*(_collect(b.generate(r)) for r in reqs)),
                              max_batch=1))
    ref = _run(_with_backend(lambda b: asyncio.gather(*(_collect(b.generate(r)) for r in reqs))))
    assert outs == ref


def test_abort_stops_request_and_frees_slot():
    long_req = LLMRequest("long", text_ids=[1, 2, 3, 4, 5], min_tokens=10_000, max_tokens=10_000, seed=7)
    short_req = _requests()[1]

    async def scenario(b):
        got = []
        other = asyncio.ensure_future(_collect(b.generate(short_req)))
        async for toks in b.generate(long_req):
            got.extend(toks)
            if len(got) == 5:
                await b.abort("long")
        # the iterator ended on its own after the abort, long before min_tokens
        assert 5 <= len(got) < 10_000
        short = await other
        for _ in range(100):
            if b.active_requests() == 0:
                break
            await asyncio.sleep(0.01)
        assert b.active_requests() == 0
        await b.abort("unknown-id")    # ignored
        return short

    short = _run(_with_backend(scenario))
    lo, hi = short_req.length_bounds()
    assert lo <= len(short) <= hi


def test_consumer_leaving_early_aborts():
    req = LLMRequest("gone", text_ids=[3, 4], min_tokens=10_000, max_tokens=10_000, seed=1)

    async def scenario(b):
        it = b.generate(req)
        async for _ in it:
            break
        await it.aclose()
        return await _drained(b)

    assert _run(_with_backend(scenario))


def test_bistream_with_late_text():
    g = torch.Generator().manual_seed(11)
    text = torch.randint(0, 511, (23,), generator=g).tolist()
    prompt_text = torch.randint(0, 511, (6,), generator=g).tolist()
    prompt_speech = torch.randint(0, 6561, (20,), generator=g).tolist()
    req = LLMRequest("bi", text_ids=[], prompt_text_ids=prompt_text, prompt_speech_tokens=prompt_speech,
                     seed=4, max_tokens=150)
    plain = LLMRequest("plain", text_ids=[7, 8, 9], seed=5)

    async def late(b):
        speech_seen, plain_done = asyncio.Event(), asyncio.Event()

        async def text_stream():
            yield text[:3]
            yield text[3:6]
            # The rest of the text only comes once speech was decoded from the first part and a
            # concurrent request finished meanwhile: a backend that blocked on this request while it
            # waits for text, or that needed all text first, deadlocks here.
            await asyncio.wait_for(speech_seen.wait(), 60)
            await asyncio.wait_for(plain_done.wait(), 60)
            for i in range(6, len(text), 4):
                await asyncio.sleep(0.01)
                yield text[i:i + 4]

        async def consume_bi():
            out = []
            async for toks in b.generate_bistream(req, text_stream()):
                speech_seen.set()
                out.extend(toks)
            return out

        async def consume_plain():
            out = await _collect(b.generate(plain))
            plain_done.set()
            return out

        return await asyncio.gather(consume_bi(), consume_plain())

    async def upfront(b):
        async def all_text():
            yield text
        return await _collect(b.generate_bistream(req, all_text()))

    bi, pl = _run(_with_backend(late))
    assert bi and all(0 <= t < 6561 for t in bi) and len(bi) <= 150
    assert 2 * 3 <= len(pl) <= 20 * 3
    # The algorithm consumes text one id at a time when it needs it, so arrival timing does not
    # change the result.
    assert _run(_with_backend(upfront)) == bi


def test_bistream_without_prompt_and_abort():
    text = list(range(100, 140))
    req = LLMRequest("bi2", text_ids=[], seed=8)

    async def never_ending():
        for t in text:
            yield [t]
        await asyncio.sleep(3600)

    async def scenario(b):
        got, aborted = [], []
        async for toks in b.generate_bistream(req, never_ending()):
            got.extend(toks)
            if len(got) >= 20 and not aborted:
                aborted.append(True)
                await b.abort("bi2")
        for _ in range(100):
            if b.active_requests() == 0:
                break
            await asyncio.sleep(0.01)
        return got, b.active_requests()

    got, active = _run(_with_backend(scenario))
    # without the abort the stream would wait for text forever (fills every 15 speech tokens)
    assert 20 <= len(got) <= 3 * len(text) and active == 0


def test_bistream_text_source_error_propagates():
    req = LLMRequest("bad", text_ids=[], seed=1)

    async def failing():
        yield [1, 2, 3, 4, 5, 6]
        await asyncio.sleep(0.05)
        raise KeyError("text source broke")

    async def scenario(b):
        with pytest.raises(KeyError):
            await _collect(b.generate_bistream(req, failing()))
        return await _drained(b)

    assert _run(_with_backend(scenario))
