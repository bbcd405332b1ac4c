"""vLLM backend vs the torch LLM on a full-size (CosyVoice2-0.5B dimensions) random checkpoint:
greedy tokens and log-probabilities, float32 on both sides (H100)."""
from __future__ import annotations

import os
import random

import pytest

from engine.llm import ids as uid
from engine.llm.backend import LLMRequest
from tests.gpu.conftest import gpu_skip_reason
from tests.gpu import helpers as H

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))]
DTYPE = os.environ.get("COSY_VLLM_TEST_DTYPE", "float32")
# float32 tolerances allow TF32-level differences between vLLM's and torch's matmuls.
LP_TOL, MARGIN_TOL = (2e-2, 4e-2) if DTYPE == "float32" else (0.3, 0.5)


@pytest.fixture(scope="module")
def setup(loop, tmp_path_factory):
    backend, ref = H.start_vllm_and_reference(loop, tmp_path_factory, "full", DTYPE, gpu_memory_utilization=0.3,
                                              max_num_seqs=64, warmup_requests=2)
    yield backend, ref
    loop.run_until_complete(backend.close())


def test_full_size_greedy_tokens_and_logprobs_equal_torch(setup, loop):
    backend, ref = setup
    rng = random.Random(11)
    reqs = [LLMRequest("full-zs", [rng.randrange(151000) for _ in range(10)],
                       prompt_text_ids=[rng.randrange(151000) for _ in range(6)],
                       prompt_speech_tokens=[rng.randrange(6561) for _ in range(50)], max_tokens=120),
            LLMRequest("full-xl", [rng.randrange(151000) for _ in range(8)], max_tokens=120)]
    total = 0
    for req in reqs:
        prompt = uid.prefix_unified_ids(req.prompt_text_ids, req.text_ids, req.prompt_speech_tokens)
        lo, hi = req.length_bounds()
        kw = backend.request_kwargs(req, len(prompt))
        kw["logprobs"] = 1
        toks, lps = loop.run_until_complete(H.vllm_raw(backend, req.request_id, prompt, kw))
        ref_toks, ref_logp, margins = H.torch_greedy(ref, prompt, lo, hi)
        n, max_d = H.compare_greedy(toks, lps, ref_toks, ref_logp, margins, LP_TOL, MARGIN_TOL)
        print(f"{req.request_id}: {len(toks)} tokens, {n} compared, max |dlogp| {max_d:.2e}")
        total += n
    assert total >= 40
