"""TTSEngine end to end on the tiny random checkpoint (TorchLLMBackend, CPU): segments and bistream
input modes, continuous chunk numbering, final chunk, cancel, config and error paths."""
from __future__ import annotations

import asyncio
import io
import math

import numpy as np
import pytest
import soundfile as sf

from engine.api import AudioChunk, EngineError, InlinePrompt, SegmentEvent, StreamOptions
from engine.checkpoint import CheckpointError
from engine.engine import EngineConfig, TTSEngine

TOKENS_PER_CHAR = 0.5


def prompt_wav(seconds: float = 2.0, sr: int = 24000, seed: int = 0) -> bytes:
    """A voiced-sounding test prompt (harmonic tone with vibrato and a little noise) as WAV bytes."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
    x = x + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, (0.5 * x / np.abs(x).max()).astype(np.float32), sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


async def _engine(model_dir, **kw) -> TTSEngine:
    cfg = EngineConfig.load(None, model_dir=str(model_dir), device="cpu", seed=0, cuda_graphs=False,
                            fixed_tokens_per_char=TOKENS_PER_CHAR, **kw)
    eng = TTSEngine(cfg)
    await eng.start()
    await eng.register_voice("v", "This is a prompt.", prompt_wav())
    return eng


async def _collect(stream) -> list:
    return [ev async for ev in stream]


def _check_audio_events(events):
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert chunks, "no audio"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    for c in chunks:
        assert c.samples.dtype == np.float32 and c.samples.ndim == 1
        assert np.all(np.isfinite(c.samples)) and np.abs(c.samples).max() <= 1.0
    return chunks


def test_segments_mode_end_to_end(tiny_model_dir, one_thread):
    async def main():
        eng = await _engine(tiny_model_dir)
        try:
            s = await eng.open_stream(StreamOptions(voice_id="v"))
            for frag in ["Hello there, my frie", "nd. This is the second sen", "tence of the test! And a thi",
                         "rd one without an end"]:
                s.push_text(frag)
                await asyncio.sleep(0.01)
            s.end()
            events = await _collect(s)
            assert s.stats().audio_seconds > 0
            return events, eng.metrics()
        finally:
            await eng.close()

    events, metrics = run(main())
    segs = [e for e in events if isinstance(e, SegmentEvent)]
    assert len(segs) >= 2 and [g.index for g in segs] == list(range(len(segs)))
    chunks = _check_audio_events(events)
    # each segment is its own utterance with a fixed token count: its audio is exactly 960 per token
    for g in segs:
        n = sum(len(c.samples) for c in chunks if c.segment_index == g.index)
        assert n == 960 * max(1, math.ceil(len(g.text) * TOKENS_PER_CHAR)), g
        assert all(c.segment_text == g.text for c in chunks if c.segment_index == g.index)
    # a segment's event comes before its audio; segments are voiced in order
    order = [e.index if isinstance(e, SegmentEvent) else None for e in events]
    for c in chunks:
        assert order.index(c.segment_index) < events.index(c)
    assert [c.segment_index for c in chunks] == sorted(c.segment_index for c in chunks)
    assert metrics["live_streams"] == 0


def test_bistream_mode_end_to_end(tiny_model_dir, one_thread):
    async def main():
        eng = await _engine(tiny_model_dir)
        try:
            s = await eng.open_stream(StreamOptions(voice_id="v", input_mode="bistream", mode="zero_shot"))
            for frag in ["Streaming text, ", "word by word, ", "into the speech model."]:
                s.push_text(frag)
                await asyncio.sleep(0.01)
            s.end()
            return await _collect(s)
        finally:
            await eng.close()

    events = run(main())
    chunks = _check_audio_events(events)
    segments = [e.text for e in events if isinstance(e, SegmentEvent)]
    assert segments
    # the fixed token ratio caps the bistream request over all of its text, and nothing stops it earlier
    expected_tokens = math.ceil(sum(len(t) for t in segments) * TOKENS_PER_CHAR)
    assert sum(len(c.samples) for c in chunks) == expected_tokens * 960


# its first segment has 30 tokens; a stream's first chunk voices 15 of them (first_chunk_max_tokens=15 below:
# exactly 15, however many the LLM has produced by then), so it is a non-final chunk, which the prefix cache serves
LONG_SENTENCE = ("A single long sentence without any pause in it that goes on and on about the weather and the "
                 "sea and the long road home so that its speech tokens fill more than one chunk of the flow. ")


@pytest.mark.parametrize("prefix_cache_voices", [0, 2])
def test_concurrent_streams_and_modes(prefix_cache_voices, tiny_model_dir, one_thread):
    async def main():
        eng = await _engine(tiny_model_dir, prefix_cache_voices=prefix_cache_voices, first_chunk_max_tokens=15)
        try:
            opts = [StreamOptions(voice_id="v"), StreamOptions(voice_id="v", mode="cross_lingual"),
                    StreamOptions(voice_id="v", mode="instruct2", instruct_text="Speak slowly."),
                    StreamOptions(inline_prompt=InlinePrompt("Another prompt.", prompt_wav(1.5, 16000, 1)),
                                  speed=1.25)]
            streams = [await eng.open_stream(o) for o in opts]
            for st in streams:
                st.push_text(LONG_SENTENCE)
                st.end()
            results = await asyncio.gather(*[_collect(st) for st in streams])
            cache = eng.scheduler.runner.prefix_cache
            return results, list(eng.scheduler.steps), cache and len(cache._slots)
        finally:
            await eng.close()

    results, steps, cached_voices = run(main())
    # both voices (2 s and 1.5 s prompts) have a 50-frame voice-only prefix; warm-up's voice is forgotten
    assert cached_voices == (2 if prefix_cache_voices else None)
    for events in results:
        _check_audio_events(events)
    # every chunk came out of exactly one scheduler call (batching itself: tests/test_scheduler.py)
    n_chunks = sum(1 for events in results for e in events if isinstance(e, AudioChunk) and len(e.samples))
    assert sum(r.batch for r in steps) == n_chunks


def test_cancel_mid_stream_stops_audio_and_frees_state(tiny_model_dir, one_thread):
    async def main():
        eng = await _engine(tiny_model_dir, first_chunk_tokens=5, min_chunk_tokens=5, max_chunk_tokens=5)
        try:
            s = await eng.open_stream(StreamOptions(voice_id="v", first_chunk_tokens=5, max_chunk_tokens=5))
            s.push_text("This is a rather long sentence that will take a while to speak out loud. " * 3)
            s.flush()
            got = []
            async for ev in s:
                got.append(ev)
                if isinstance(ev, AudioChunk):
                    s.cancel()
            n_audio = sum(isinstance(e, AudioChunk) for e in got)
            for _ in range(200):   # the worker drops the state within one step
                await asyncio.sleep(0.02)
                if eng.scheduler.live_streams == 0 and eng.backend.active_requests() == 0:
                    break
            return n_audio, eng.scheduler.live_streams, eng.backend.active_requests(), len(eng._streams)
        finally:
            await eng.close()

    n_audio, live, active, open_streams = run(main())
    assert n_audio == 1 and live == 0 and active == 0 and open_streams == 0


def test_registered_voice_survives_restart(tiny_model_dir, tmp_path, one_thread):
    """register_voice on one engine, close it, start a new engine on the same voices_dir: the voice is
    listed, its prompt tensors are identical, and a stream with voice_id speaks with it."""
    voices_dir = tmp_path / "voices"
    text = "Hello from a voice that was saved to disk."

    async def start() -> TTSEngine:   # like _engine, without registering "v" (the restart would collide)
        eng = TTSEngine(EngineConfig.load(None, model_dir=str(tiny_model_dir), device="cpu", seed=0,
                                          cuda_graphs=False, fixed_tokens_per_char=TOKENS_PER_CHAR,
                                          voices_dir=str(voices_dir)))
        await eng.start()
        return eng

    async def main():
        eng = await start()
        try:
            info = await eng.register_voice("alice", "This is Alice speaking.", prompt_wav(seed=3))
            assert info.voice_id == "alice" and info.prompt_text == "This is Alice speaking."
            before = eng.voices.get("alice")
        finally:
            await eng.close()
        assert (voices_dir / "alice.voice.pt").is_file()

        eng = await start()
        try:
            listed = {v.voice_id: v for v in eng.list_voices()}
            assert "alice" in listed and listed["alice"] == info
            after = eng.voices.get("alice")
            s = await eng.open_stream(StreamOptions(voice_id="alice"))
            s.push_text(text)
            s.end()
            return before, after, await _collect(s)
        finally:
            await eng.close()

    before, after, events = run(main())
    assert before is not after and after.equals(before)
    assert after.speech_tokens.numel() > 0 and after.speech_feat.shape == (2 * after.speech_tokens.numel(), 80)
    chunks = _check_audio_events(events)
    segs = [e for e in events if isinstance(e, SegmentEvent)]
    assert segs and "".join(g.text for g in segs).replace(" ", "") == text.replace(" ", "")
    expected = sum(960 * max(1, math.ceil(len(g.text) * TOKENS_PER_CHAR)) for g in segs)
    assert sum(len(c.samples) for c in chunks) == expected
    assert chunks[-1].final


def test_open_stream_errors(tiny_model_dir):
    async def main():
        eng = TTSEngine(EngineConfig.load(None, model_dir=str(tiny_model_dir), device="cpu", cuda_graphs=False))
        with pytest.raises(EngineError) as e:
            await eng.open_stream(StreamOptions(voice_id="v"))
        assert e.value.code == "not_ready"
        await eng.start()
        try:
            cases = [(StreamOptions(voice_id="nobody"), "voice_not_found"),
                     (StreamOptions(), "missing_field"),
                     (StreamOptions(voice_id="x", mode="bogus"), "invalid_field"),
                     (StreamOptions(voice_id="x", speed=5.0), "invalid_field"),
                     (StreamOptions(voice_id="x", mode="instruct2"), "missing_field"),
                     (StreamOptions(inline_prompt=InlinePrompt("hi", b"not audio")), None)]
            for opts, code in cases:
                with pytest.raises(EngineError) as e:
                    await eng.open_stream(opts)
                assert code is None or e.value.code == code, (opts, e.value.code)
        finally:
            await eng.close()

    run(main())


def test_engine_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("max_batch: 7\nfirst_chunk_tokens: 20\n")
    cfg = EngineConfig.load(p, max_batch=3)
    assert cfg.max_batch == 3 and cfg.first_chunk_tokens == 20
    with pytest.raises(ValueError):
        EngineConfig.load(p, not_a_key=1)
    default = EngineConfig.load()          # configs/engine.yaml parses and matches the dataclass
    assert default.first_chunk_tokens == 15 and default.lookahead_tokens == 3
    pol = default.policy(StreamOptions(first_chunk_tokens=10, max_chunk_tokens=50))
    assert pol.first_chunk_tokens == 10 and pol.max_chunk_tokens == 50


def test_engine_bench_cpu_smoke(tiny_model_dir, tmp_path, one_thread):
    """bench/engine_bench.py end to end on CPU (bounded run; no performance assertion)."""
    import json

    from bench.engine_bench import TIMELINE, bench, markdown, parse_args
    args = parse_args(["--model", str(tiny_model_dir), "--device", "cpu", "--concurrency", "2", "--no-batching",
                       "--baseline-concurrency", "1", "--text-chars", "30", "--max-run-s", "8", "--no-warmup",
                       "--ramp-s", "0.2"])
    meta, runs = asyncio.run(bench(args))
    assert [(r["concurrency"], r["batching"]) for r in runs] == [(2, True), (1, False)]
    for r in runs:
        assert r["wall_s"] <= 8 + 5 and r["audio_s"] > 0 and r["flow_calls"] > 0
        assert r["ttfa_from_release_first_segment_p50_s"] is not None
        # phase times (wall time on CPU) fit inside the step that ran them
        assert 0 < r["mean_flow_s"] and 0 < r["mean_hift_s"]
        assert r["mean_flow_s"] + r["mean_hift_s"] <= r["mean_step_s"]
    assert runs[1]["mean_batch"] == 1.0
    table = markdown(meta, runs)
    assert table.count("\n| ") == 2 * (1 + len(runs))      # two tables: header + one row per run
    for r in runs:   # every stage of the first audio was seen (the stages are timed on one clock)
        assert all(r[f"first_chunk_{k}_p50_s"] is not None for k in TIMELINE)
    json.dumps({"meta": meta, "runs": runs})


def test_engine_bench_variants_share_the_llm_backend(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """``--variant``: a fresh engine per variant, on the previous variant's LLM backend while the
    backend settings agree, on a new one (the old one closed) when they differ; runs are tagged, and
    the JSON is written as the runs finish (``bench`` itself writes it, not only ``main``)."""
    import json

    from bench.engine_bench import bench, markdown, parse_args
    built, closed = [], []
    build = TTSEngine._build_backend

    def counting_build(self):
        backend = build(self)
        close = backend.close

        async def counting_close():
            closed.append(backend)
            await close()
        backend.close = counting_close
        built.append(backend)
        return backend
    monkeypatch.setattr(TTSEngine, "_build_backend", counting_build)
    args = parse_args(["--model", str(tiny_model_dir), "--device", "cpu", "--concurrency", "1", "--text-chars", "20",
                       "--max-run-s", "6", "--no-warmup", "--ramp-s", "0",
                       "--variant", "a={}", "--variant", "b={max_chunk_tokens: 50}",
                       "--variant", "c={vllm: {max_num_seqs: 8}}", "--out-json", str(tmp_path / "runs.json")])
    meta, runs = asyncio.run(bench(args))
    assert json.loads((tmp_path / "runs.json").read_text())["runs"] == json.loads(json.dumps(runs))
    assert [r["variant"] for r in runs] == ["a", "b", "c"]
    assert all(r["audio_s"] > 0 for r in runs)
    assert len(built) == 2 and closed == built               # a and b shared one; c got its own
    assert meta["variants"]["b"]["overrides"] == {"max_chunk_tokens": 50}
    table = markdown(meta, runs)
    assert "| variant | c | batching |" in table and "\n| b | 1 | yes | " in table
    bad = parse_args(["--model", str(tiny_model_dir), "--device", "cpu", "--variant", "a={}",
                      "--variant", "b={no_such_key: 1}"])
    with pytest.raises(ValueError, match="no_such_key"):       # before variant a starts anything
        asyncio.run(bench(bad))
    assert len(built) == 2


def test_a_failed_start_closes_the_backend(tmp_path):
    """The engine owns its LLM backend: when its start fails (here: no checkpoint), the backend is
    closed before the error propagates, so nothing (a vLLM process) is left running."""
    class Backend:
        closed = False

        async def close(self):
            self.closed = True
    backend = Backend()
    eng = TTSEngine(EngineConfig.load(None, model_dir=str(tmp_path / "missing"), device="cpu"), backend=backend)
    with pytest.raises(CheckpointError, match="does not exist"):
        asyncio.run(eng.start())
    assert backend.closed and not eng.ready()


def test_text_normalization_switch(tiny_model_dir, one_thread):
    """On: wetext reads numbers out; off: the segment reaches the tokenizer as written."""
    async def main():
        eng = await _engine(tiny_model_dir)
        try:
            out = {}
            for flag in (True, False):
                s = await eng.open_stream(StreamOptions(voice_id="v", text_normalization=flag))
                s.push_text("I have 3 apples.")
                s.end()
                out[flag] = [e.text for e in await _collect(s) if isinstance(e, SegmentEvent)]
            return out
        finally:
            await eng.close()

    out = run(main())
    assert "three" in " ".join(out[True]) and "3" not in " ".join(out[True])
    assert " ".join(out[False]) == "I have 3 apples."
