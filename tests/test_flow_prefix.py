"""The per-voice prefix cache (engine/flow/prefix.py): rows continued from cached keys, values and
conv inputs give the same mel as the full computation.

Uses the golden tiny-s1 ``model/flow.pt``. Tolerance as the batched-vs-single test (float32, only the
order of float operations differs): atol 1e-5 on mels whose values reach ~5-10.
"""
from __future__ import annotations

import pytest
import torch

from engine.flow.prefix import PrefixRows, PrefixStore, VoicePrefixCache, voice_prefix_frames
from tests.test_flow_batch import BATCH_ATOL, _stream


def test_voice_prefix_frames():
    # Whole 25-token blocks whose last token + 3 lookahead tokens stay in the prompt, in 50 Hz frames.
    assert [voice_prefix_frames(p) for p in (0, 27, 28, 52, 53, 75, 78, 250)] == [0, 0, 50, 50, 100, 100, 150, 450]


def _calls(flow, streams, emb, streaming, finalize, prefix=None):
    return flow.inference_batch([s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams],
                                emb, streaming, finalize, prefix=prefix)


def test_prefix_rows_equal_full_rows(flow):
    gen = torch.Generator().manual_seed(7)
    # Two voices (60 and 75 prompt tokens: 100 cacheable frames each), a voice too short to cache (20),
    # a final (full-context) row of a cached voice, chunk boundaries crossed by the token counts.
    voices = [_stream(gen, 1, p)[1:] for p in (60, 75, 20)]
    emb_voice = torch.randn(3, 192, generator=gen)
    rows = [(0, 40, True), (1, 23, True), (0, 77, True), (2, 30, True), (1, 31, False)]   # voice, N, streaming
    streams = [(torch.randint(0, 6561, (n,), generator=gen), *voices[v]) for v, n, _ in rows]
    emb = torch.stack([emb_voice[v] for v, _, _ in rows])
    streaming = [s for *_, s in rows]
    finalize = [not s for s in streaming]
    full = _calls(flow, streams, emb, streaming, finalize)

    store = PrefixStore(flow.decoder.estimator, slots=2, frames=150, steps=10)
    cache = VoicePrefixCache(store)
    slots, frames = [], []
    for (v, _, st), (_, prompt, feat) in zip(rows, streams):
        def record(slot, n, prompt=prompt, feat=feat, v=v):
            flow.record_prefix(store, slot, prompt, feat, emb_voice[v], n)
        slot, n = cache.lookup(v, flow.prefix_frames(len(prompt)), set(slots), record) if st else (0, 0)
        slots.append(slot)
        frames.append(n)
    assert frames == [100, 100, 100, 0, 0]
    cached = _calls(flow, streams, emb, streaming, finalize, PrefixRows(store, slots, frames))
    for i, (a, b) in enumerate(zip(full, cached)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(b, a, atol=BATCH_ATOL, rtol=0, msg=f"row {i}")


def test_prefix_rejects_what_is_not_voice_only(flow):
    gen = torch.Generator().manual_seed(8)
    tokens, prompt, feat = _stream(gen, 30, 40)         # 40 prompt tokens: 50 cacheable frames
    store = PrefixStore(flow.decoder.estimator, slots=1, frames=100, steps=10)
    with pytest.raises(ValueError):
        flow.record_prefix(store, 0, prompt, feat, torch.randn(192), 100)
    flow.record_prefix(store, 0, prompt, feat, torch.randn(192), 50)
    for streaming, n in ((False, 50), (True, 100)):
        with pytest.raises(ValueError):
            flow.inference_batch([tokens], [prompt], [feat], torch.randn(1, 192), [streaming], [not streaming],
                                 prefix=PrefixRows(store, [0], [n]))


def test_cache_evicts_least_recently_used_slot_not_in_use():
    from engine.flow.estimator import SelfAttention

    class Est(torch.nn.Module):   # the store only needs the estimator's layer lists and dtype
        cfg = type("C", (), {"static_chunk_size": 50})
        def __init__(self):
            super().__init__()
            self.attn = SelfAttention(1, 1, 1)
        def prefix_layers(self):
            return [self.attn], []
    cache = VoicePrefixCache(PrefixStore(Est(), slots=2, frames=100, steps=1))
    recorded = []
    rec = lambda slot, n: recorded.append(slot)  # noqa: E731
    assert cache.lookup("a", 150, set(), rec) == (0, 100)
    assert cache.lookup("b", 50, set(), rec) == (1, 50)
    assert cache.lookup("a", 150, set(), rec) == (0, 100)          # hit: "b" is now least recent
    assert cache.lookup("c", 100, set(), rec) == (1, 100)          # evicts "b"
    assert cache.lookup("d", 100, {0, 1}, rec) == (0, 0)           # every slot in use by this call
    assert cache.lookup("e", 0, set(), rec) == (0, 0)              # nothing cacheable
    assert recorded == [0, 1, 1]


def test_prefix_probe_runs_on_cpu(tiny_model_dir, capsys, one_thread):
    """bench/prefix_probe.py end to end on CPU (one shape; no performance assertion)."""
    from bench.prefix_probe import main
    main(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--iters", "1",
          "--rows", "2", "--frames", "160"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 160 |")]
    assert len(rows) == 1 and all(float(c) > 0 for c in rows[0].strip("| ").split(" | ")[2:])
