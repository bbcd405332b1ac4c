"""``BatchedToken2Wav`` on random tiny weights (no golden data): on CPU, and on CUDA where there is one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.scheduler import CallItem, FlowPrompt
from engine.streaming.policy import ChunkPlan


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_a_call_run_between_the_euler_steps_of_another_changes_neither(device, tiny_model_dir, one_thread):
    """What preemption does: stream b's whole call runs inside stream a's flow solve. On CUDA both
    replay CUDA graphs that share one set of static buffers."""
    from engine.models import load_models
    from engine.streaming.cuda_graphs import GraphedEstimator
    from engine.streaming.runner import BatchedToken2Wav
    m = load_models(tiny_model_dir, device, "float32", load_llm=False)
    m.flow.decoder.estimator = GraphedEstimator(m.flow.decoder.estimator, rows=[2, 4], frames=[128, 256],
                                                max_elements=10**6, use_graphs=device == "cuda")
    runner = BatchedToken2Wav(m.flow, m.hift, device)
    est = m.flow.decoder.estimator
    upfront = est.capture_all(torch.device(device), torch.float32)   # as the engine does at start
    rng = torch.Generator().manual_seed(0)
    prompt = FlowPrompt(torch.randint(0, 6561, (20,), generator=rng), torch.randn(40, 80, generator=rng),
                        torch.randn(192, generator=rng))
    tokens = torch.randint(0, 6561, (40,), generator=rng)

    def items(n, final, seed):
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return [CallItem(prompt, tokens[:n], ChunkPlan(n, 0, final), None, g)]

    alone_a, alone_b = runner.run(items(40, False, 1))[0][0], runner.run(items(21, True, 2))[0][0]
    inner = []
    outer = runner.run(items(40, False, 1), between=lambda: inner or inner.append(runner.run(items(21, True, 2))))
    assert len(inner) == 1 and len(alone_a) > 0 and len(alone_b) > 0
    assert upfront == (4 if device == "cuda" else 0) and len(est._graphs) == upfront   # no capture on the way
    for got, want in ((outer[0][0], alone_a), (inner[0][0][0], alone_b)):
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_graphed_encoder_pads_to_its_bucket_exactly(device, tiny_model_dir, one_thread):
    """The flow encoder padded to a (rows, tokens) bucket (and, on CUDA, replayed from a graph) gives
    each row's frames as the plain encoder does, for mixed lengths, streaming flags and context."""
    from engine.models import load_models
    from engine.streaming.cuda_graphs import GraphedEncoder
    enc = load_models(tiny_model_dir, device, "float32", load_llm=False).flow.encoder
    g = torch.Generator().manual_seed(1)
    D = enc.embed.out[0].in_features
    xs, ctx = torch.randn(3, 37, D, generator=g).to(device), torch.randn(3, 3, D, generator=g).to(device)
    lens = torch.tensor([37, 20, 29], device=device)
    has_ctx = torch.tensor([True, False, True], device=device)
    streaming = torch.tensor([True, True, False], device=device)
    want, want_lens = enc(xs, lens, ctx, has_ctx, streaming)
    graphed = GraphedEncoder(enc, rows=[2, 4], tokens=[32, 64], use_graphs=device == "cuda")
    for _ in range(2):                                      # capture (CUDA), then replay
        got, got_lens = graphed(xs, lens, ctx, has_ctx, streaming)
        assert got.shape == want.shape and torch.equal(got_lens, want_lens)
        for i, n in enumerate(lens.tolist()):
            assert (got[i, :2 * n] - want[i, :2 * n]).abs().max().item() <= 1e-4
    assert graphed.replays == (2 if device == "cuda" else 0)
    if device == "cuda":   # graphs captured up front under the plain "cuda" device are the ones calls replay
        upfront = GraphedEncoder(enc, rows=[2, 4], tokens=[32, 64])
        assert upfront.capture_all(torch.device("cuda")) == 4
        upfront(xs, lens, ctx, has_ctx, streaming)
        assert len(upfront._graphs) == 4 and upfront.replays == 1
    assert graphed(xs[:, :5], lens.clamp(max=5), ctx, has_ctx, streaming)[0].shape[1] == 10   # 5 tokens: 32 bucket
    assert graphed(xs.repeat(2, 1, 1), lens.repeat(2), ctx.repeat(2, 1, 1))[0].shape[0] == 6   # 6 rows: eager


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_graphed_hift_pads_to_its_bucket_exactly(device, tiny_model_dir, one_thread, exact_convs):
    """vocode_batch through GraphedHiFT (padded to a (rows, frames) bucket; on CUDA replayed from a
    graph) gives every stream the samples and cache of the plain HiFT, first and later chunks mixed."""
    from engine.models import load_models
    from engine.streaming.cuda_graphs import GraphedHiFT
    from engine.token2wav import VocodeItem, vocode_batch
    hift = flat_f0(load_models(tiny_model_dir, device, "float32", load_llm=False).hift)
    graphed = GraphedHiFT(hift, rows=[2, 4], frames=[32, 64], use_graphs=device == "cuda")
    g = torch.Generator().manual_seed(2)
    mels = [(torch.randn(80, n, generator=g) * 2 - 4).to(device) for n in (20, 37, 12)]

    def chunks(module, seed):
        gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(3)]
        first = [VocodeItem(m, None, False, gen) for m, gen in zip(mels, gens)]
        out1 = vocode_batch(module, first)
        later = [VocodeItem(m[:, :9], it.cache, i == 2, gen) for i, (m, it, gen) in enumerate(zip(mels, first, gens))]
        return out1 + vocode_batch(module, later), [it.cache for it in later]

    want, want_caches = chunks(hift, 10)
    for _ in range(2):                                  # capture (CUDA), then replay
        got, caches = chunks(graphed, 10)
        for a, b in zip(got, want):   # the batch tolerance of tests/test_hift_batch.py (float rounding)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4
        for a, b in zip(caches, want_caches):
            assert (a is None) == (b is None)
            if a is not None:
                assert (a.source - b.source).abs().max().item() <= 1e-4
                assert np.abs(a.speech - b.speech).max() <= 1e-4
    assert graphed.replays == (4 if device == "cuda" else 0)
    if device == "cuda":
        upfront = GraphedHiFT(hift, rows=[2, 4], frames=[32, 64])
        assert upfront.capture_all(torch.device("cuda"), 3840) == 8


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_the_prefix_cache_changes_no_sample(device, tiny_model_dir, one_thread, exact_convs):
    """Calls through a one-voice prefix cache (on CUDA: plain and prefixed graphs captured up front,
    a recording graph included) give the samples of the plain runner: a non-final chunk that records
    its voice, a call of another voice run between its Euler steps (the only slot is in use: computed
    whole, without the cache) and the voice's final chunk (full-context masks: the same)."""
    from engine.flow.prefix import PrefixStore, VoicePrefixCache
    from engine.models import load_models
    from engine.streaming.cuda_graphs import GraphedEstimator
    from engine.streaming.runner import BatchedToken2Wav
    m = load_models(tiny_model_dir, device, "float32", load_llm=False)
    flat_f0(m.hift)
    rng = torch.Generator().manual_seed(3)
    voices = [FlowPrompt(torch.randint(0, 6561, (75,), generator=rng), torch.randn(150, 80, generator=rng),
                         torch.randn(192, generator=rng)) for _ in range(2)]
    tokens = torch.randint(0, 6561, (40,), generator=rng)

    def items(voice, n, final):
        g = torch.Generator(device=device)
        g.manual_seed(n)
        return [CallItem(voices[voice], tokens[:n], ChunkPlan(n, 0, final), None, g)]

    plain = BatchedToken2Wav(m.flow, m.hift, device)
    want = [plain.run(items(0, 40, False))[0][0], plain.run(items(1, 30, False))[0][0],
            plain.run(items(0, 40, True))[0][0]]

    est = GraphedEstimator(m.flow.decoder.estimator, rows=[2, 4], frames=[128, 256], max_elements=10**6,
                           use_graphs=device == "cuda")
    est.prefix_store = PrefixStore(est, slots=1, frames=100, steps=10)
    m.flow.decoder.estimator = est
    upfront = est.capture_all(torch.device(device), torch.float32)
    runner = BatchedToken2Wav(m.flow, m.hift, device, prefix_cache=VoicePrefixCache(est.prefix_store))
    assert runner.cached_frames(voices[0], ChunkPlan(40, 0, False)) == 100
    inner = []
    first = runner.run(items(0, 40, False), between=lambda: inner or inner.append(runner.run(items(1, 30, False))))
    got = [first[0][0], inner[0][0][0], runner.run(items(0, 40, True))[0][0]]
    assert list(runner.prefix_cache._slots.values()) == [(0, 100)]        # voice 0 only
    assert runner._prefix_rows(items(0, 40, True)) is None                  # a final row reads nothing
    assert upfront == (2 * 4 + 2 if device == "cuda" else 0) and len(est._graphs) == upfront
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5, (i, np.abs(a - b).max())


def flat_f0(hift):
    """``hift`` with a flat 120 Hz f0 (as tests/test_hift_batch.py): the random f0 head's huge f0 would
    amplify float rounding into phase differences."""
    with torch.no_grad():
        hift.f0_predictor.classifier.weight.zero_()
        hift.f0_predictor.classifier.bias.fill_(120.0)
    return hift
