"""Scheduler logic: chunk planning, deadline ordering, budget packing, cancel (fake token2wav runner),
plus the real batched flow + HiFT path on the golden tiny-s1 weights (golden chunk schedules,
batching independence, chunk joins)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine.scheduler import CallItem, ChunkOut, FlowPrompt, Scheduler, SchedulerConfig, StreamSpec
from engine.streaming.policy import (Candidate, ChunkPlan, ChunkPolicy, PlaybackClock, chunk_samples,
                                     deadline_key, flow_cost_frames, pack, plan_chunk, schedule_all)


# ---------------------------------------------------------------- pure policy
def test_schedule_all_matches_golden_rule():
    # N=50, hops 15 then 25 (golden hop15_then25): (18,0) (43,15) final (50,40)
    assert schedule_all(50, [15, 25]) == [ChunkPlan(18, 0, False), ChunkPlan(43, 15, False), ChunkPlan(50, 40, True)]
    # N=50, hop 43 then 50 (upstream_head_fresh with P=7: 25+18)
    assert schedule_all(50, [43, 50]) == [ChunkPlan(46, 0, False), ChunkPlan(50, 43, True)]
    # too few tokens for any non-final chunk: one final call
    assert schedule_all(10, [15]) == [ChunkPlan(10, 0, True)]


def test_plan_chunk_waits_for_tokens_and_lookahead():
    assert plan_chunk(17, 0, False, 15, 3) is None          # 15 + 3 lookahead not there yet
    assert plan_chunk(18, 0, False, 15, 3) == ChunkPlan(18, 0, False)
    assert plan_chunk(17, 0, True, 15, 3) == ChunkPlan(17, 0, True)
    assert plan_chunk(15, 15, True, 25, 3) is None          # nothing left
    assert plan_chunk(20, 15, True, 25, 3) == ChunkPlan(20, 15, True)


def test_chunk_samples_accounting():
    plans = schedule_all(50, [15, 25])
    n = [chunk_samples(p, i == 0) for i, p in enumerate(plans)]
    assert n == [10560, 24000, 13440] and sum(n) == 50 * 960
    single = schedule_all(12, [15])
    assert sum(chunk_samples(p, i == 0) for i, p in enumerate(single)) == 12 * 960


def test_policy_hop_grows_with_slack_and_is_bounded():
    pol = ChunkPolicy(first_chunk_tokens=15, min_chunk_tokens=20, max_chunk_tokens=100, slack_fraction=0.5)
    assert pol.hop(0, None) == 15
    assert pol.hop(1, 0.1) == 20                     # little slack: the minimum
    assert pol.hop(1, 4.0) == 50                     # 4 s buffered * 25 tok/s * 0.5
    assert pol.hop(1, 100.0) == 100                  # capped
    assert pol.hop(1, -1.0) == 20                    # underrun: smallest chunk
    hops = [pol.hop(1, s) for s in np.linspace(0, 20, 50)]
    assert hops == sorted(hops)
    assert ChunkPolicy(fixed_hops=[43, 50]).hop(0, 9.0) == 43
    assert ChunkPolicy(fixed_hops=[43, 50]).hop(5, 0.0) == 50


def test_policy_hop_takes_every_available_token_once_audio_flows():
    pol = ChunkPolicy(first_chunk_tokens=15, min_chunk_tokens=20, max_chunk_tokens=100, lookahead=3)
    assert pol.hop(0, None, available=80) == 15               # a stream's first chunk stays small
    grows = ChunkPolicy(first_chunk_tokens=15, first_chunk_max_tokens=30, lookahead=3)
    assert grows.hop(0, None, available=18) == 15             # planned as soon as 15 + 3 exist
    assert grows.hop(0, None, available=27) == 24             # it waited: what arrived meanwhile too
    assert grows.hop(0, None, available=80) == 30             # up to first_chunk_max_tokens
    assert grows.hop(0, None, available=25, llm_done=True) == 25   # all of a short utterance: one call
    assert pol.hop(1, -1.0, available=63) == 60               # behind: all but the lookahead
    assert pol.hop(1, -1.0, available=10) == 20               # too few: wait for the minimum
    assert pol.hop(1, 0.5, available=500) == 100              # capped
    assert pol.hop(1, 4.0, available=30) == 50                # slack growth still applies
    assert pol.hop(0, 0.2, available=40, llm_done=True) == 40  # the rest fits one chunk: the final call
    # with the LLM done, plan_chunk then makes that one final call instead of a chunk + 3-token tail
    assert plan_chunk(40, 0, True, pol.hop(0, 0.2, 40, True), 3) == ChunkPlan(40, 0, True)
    assert plan_chunk(63, 0, False, pol.hop(1, -1.0, 63), 3) == ChunkPlan(63, 0, False)


def test_deadline_order_first_chunks_then_least_slack():
    cands = [Candidate(deadline_key(True, 2.0, 0.0), 10, "ahead", ChunkPlan(1, 0, True)),
             Candidate(deadline_key(True, -0.5, 0.0), 10, "underrun", ChunkPlan(1, 0, True)),
             Candidate(deadline_key(False, None, 5.0), 10, "new-late", ChunkPlan(1, 0, True)),
             Candidate(deadline_key(False, None, 1.0), 10, "new-early", ChunkPlan(1, 0, True)),
             Candidate(deadline_key(True, 0.3, 0.0), 10, "short", ChunkPlan(1, 0, True))]
    order = [c.stream_id for c in pack(cands, 10**9, 100)]
    assert order == ["new-early", "new-late", "underrun", "short", "ahead"]


def test_pack_respects_budget_and_batch_limit():
    mk = lambda sid, slack, cost: Candidate(deadline_key(True, slack, 0), cost, sid, ChunkPlan(1, 0, True))
    cands = [mk("a", 0.1, 30), mk("b", 0.2, 50), mk("c", 0.3, 20), mk("d", 0.4, 10)]
    # padded cost = rows x longest row: a+b = 100 > 90 (b skipped), a+c = 60, a+c+d = 90
    assert [c.stream_id for c in pack(cands, 90, 10)] == ["a", "c", "d"]
    assert [c.stream_id for c in pack(cands, 10, 10)] == ["a"]              # most urgent always runs
    assert [c.stream_id for c in pack(cands, 1000, 2)] == ["a", "b"]
    first = Candidate(deadline_key(False, None, 0.0), 20, "new", ChunkPlan(1, 0, True), first_audio=True)
    assert [c.stream_id for c in pack(cands + [first], 1000, 10, urgent_frame_budget=60)] == ["new", "a"]
    assert len(pack(cands, 1000, 10, urgent_frame_budget=60)) == 4          # no first chunk: full budget
    # with buckets of 4 rows, a 2nd or 3rd stream is free up to the bucket's longest row
    bucketed = lambda rows, frames: -(-rows // 4) * 4 * frames  # noqa: E731
    assert [c.stream_id for c in pack(cands, 120, 10)] == ["a", "b"]
    assert [c.stream_id for c in pack(cands, 120, 10, padded_cost=bucketed)] == ["a", "c", "d"]
    assert flow_cost_frames(7, ChunkPlan(18, 0, False)) == 2 * (7 + 15)
    assert flow_cost_frames(7, ChunkPlan(50, 40, True)) == 2 * (7 + 50)


def test_playback_clock_underruns():
    c = PlaybackClock()
    assert c.slack(0.0) is None
    c.deliver(1.0, 0.5)                  # plays 1.0 .. 1.5
    assert c.slack(1.2) == pytest.approx(0.3)
    c.deliver(1.4, 0.5)                  # in time: plays until 2.0
    assert c.underruns == 0 and c.play_end == pytest.approx(2.0)
    c.deliver(2.5, 1.0)                  # 0.5 s gap
    assert c.underruns == 1 and c.play_end == pytest.approx(3.5)
    c.deliver(4.0, 1.0, count_underrun=False)
    assert c.underruns == 1


# ---------------------------------------------------------------- scheduler with a fake runner
class FakeRunner:
    """Samples = the absolute sample index within the utterance (so joins are checkable)."""

    def __init__(self):
        self.calls: list[list[tuple[ChunkPlan, int]]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def run(self, items: list[CallItem], between=None):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append([(it.plan, int(it.tokens.shape[0])) for it in items])
        for _ in range(3 if between else 0):     # as between Euler steps
            between()
        out = []
        for it in items:
            first = it.cache is None
            n = chunk_samples(it.plan, first)
            start = 0 if first else it.cache
            out.append((np.arange(start, start + n, dtype=np.float32), start + n))
        return out


def _prompt(p=7):
    return FlowPrompt(torch.zeros(p, dtype=torch.long), torch.zeros(2 * p, 80), torch.zeros(192))


class Collector:
    def __init__(self):
        self.chunks: list[ChunkOut | None] = []

    def __call__(self, c):
        self.chunks.append(c)


def test_scheduler_batches_streams_and_joins_exactly():
    runner = FakeRunner()
    sch = Scheduler(runner, SchedulerConfig(frame_budget=10**6, max_batch=8), clock=lambda: 0.0)
    sinks = {}
    for i in range(4):
        sinks[i] = Collector()
        sch.open(StreamSpec(f"s{i}", _prompt(), sinks[i], ChunkPolicy(fixed_hops=[15, 25])))
        sch.begin_utterance(f"s{i}", 0, "seg0")
        sch.add_tokens(f"s{i}", 0, list(range(50 + i)))
        sch.end_utterance(f"s{i}", 0)
        sch.end_stream(f"s{i}")
    while sch.step_once():
        pass
    assert [len(c) for c in runner.calls] == [4, 4, 4]        # every step served all four streams
    for i, col in sinks.items():
        audio = np.concatenate([c.samples for c in col.chunks])
        np.testing.assert_array_equal(audio, np.arange((50 + i) * 960, dtype=np.float32))
        assert [c.final for c in col.chunks] == [False, False, True]
        assert all(c.tag == "seg0" for c in col.chunks)
    assert sch.live_streams == 0


def test_scheduler_no_batching_serves_one_stream_per_call():
    runner = FakeRunner()
    sch = Scheduler(runner, SchedulerConfig(max_batch=1), clock=lambda: 0.0)
    for i in range(3):
        sch.open(StreamSpec(f"s{i}", _prompt(), Collector(), ChunkPolicy(fixed_hops=[15, 25])))
        sch.begin_utterance(f"s{i}", 0)
        sch.add_tokens(f"s{i}", 0, list(range(50)))
        sch.end_utterance(f"s{i}", 0)
    while sch.step_once():
        pass
    assert len(runner.calls) == 9 and all(len(c) == 1 for c in runner.calls)


def test_scheduler_waits_for_lookahead_then_streams_segments_in_order():
    runner = FakeRunner()
    sch = Scheduler(runner, SchedulerConfig(), clock=lambda: 0.0)
    col = Collector()
    sch.open(StreamSpec("s", _prompt(), col, ChunkPolicy(fixed_hops=[15, 25])))
    sch.begin_utterance("s", 0, "a")
    sch.add_tokens("s", 0, list(range(17)))
    assert not sch.step_once()                       # 17 < 15 + 3
    sch.add_tokens("s", 0, [17])
    assert sch.step_once() and len(col.chunks) == 1 and not col.chunks[0].final_of_utterance
    sch.begin_utterance("s", 1, "b")                 # queued behind segment 0
    sch.add_tokens("s", 1, list(range(30)))
    sch.end_utterance("s", 1)
    assert not sch.step_once()                       # segment 0 not finished: segment 1 waits
    sch.add_tokens("s", 0, list(range(18, 20)))
    sch.end_utterance("s", 0)
    sch.begin_utterance("s", 2, "empty")             # the LLM produced nothing for this one
    sch.end_utterance("s", 2)
    sch.end_stream("s")
    while sch.step_once():
        pass
    assert [c.tag for c in col.chunks] == ["a", "a", "b", "b"]
    assert [c.final for c in col.chunks] == [False, False, False, True]
    assert sum(len(c.samples) for c in col.chunks if c.tag == "a") == 20 * 960
    assert sum(len(c.samples) for c in col.chunks if c.tag == "b") == 30 * 960


def test_scheduler_end_after_last_segment_sends_empty_final():
    sch = Scheduler(FakeRunner(), SchedulerConfig(), clock=lambda: 0.0)
    col = Collector()
    sch.open(StreamSpec("s", _prompt(), col))
    sch.begin_utterance("s", 0)
    sch.add_tokens("s", 0, list(range(10)))
    sch.end_utterance("s", 0)
    while sch.step_once():
        pass
    assert len(col.chunks) == 1 and not col.chunks[0].final
    sch.end_stream("s")
    sch.step_once()
    assert len(col.chunks) == 2 and col.chunks[1].final and len(col.chunks[1].samples) == 0
    assert sch.live_streams == 0


def test_cancel_stops_audio_and_frees_state():
    runner = FakeRunner()
    sch = Scheduler(runner, SchedulerConfig(), clock=lambda: 0.0)
    keep, gone = Collector(), Collector()
    for sid, col in (("keep", keep), ("gone", gone)):
        sch.open(StreamSpec(sid, _prompt(), col, ChunkPolicy(fixed_hops=[15])))
        sch.begin_utterance(sid, 0)
        sch.add_tokens(sid, 0, list(range(40)))
    assert sch.step_once()
    assert len(gone.chunks) == 1
    sch.cancel("gone")
    sch.add_tokens("gone", 0, list(range(40)))       # late tokens for a cancelled stream are ignored
    sch.step_once()
    assert "gone" not in sch._streams and len(gone.chunks) == 1
    assert runner.calls[-1][0][1] == 33 and len(runner.calls[-1]) == 1


def test_cancel_during_the_call_in_flight_drops_its_chunk():
    runner = FakeRunner()
    runner.gate = threading.Event()
    sch = Scheduler(runner, SchedulerConfig())
    col = Collector()
    sch.open(StreamSpec("s", _prompt(), col))
    sch.begin_utterance("s", 0)
    sch.add_tokens("s", 0, list(range(40)))
    sch.start()
    try:
        assert runner.entered.wait(5)                # the worker is inside the batched call
        sch.cancel("s")
        runner.gate.set()
        for _ in range(500):
            if sch.steps:
                break
            threading.Event().wait(0.01)
    finally:
        runner.gate.set()
        sch.close()
    assert len(sch.steps) == 1 and col.chunks == [] and sch._streams == {}


def test_first_chunks_preempt_streams_with_slack():
    now = [0.0]
    runner = FakeRunner()
    sch = Scheduler(runner, SchedulerConfig(max_batch=1), clock=lambda: now[0])
    a = Collector()
    sch.open(StreamSpec("a", _prompt(), a, ChunkPolicy(fixed_hops=[15])))
    sch.begin_utterance("a", 0)
    sch.add_tokens("a", 0, list(range(100)))
    sch.step_once()                                   # a has 0.46 s of audio now
    sch.open(StreamSpec("b", _prompt(), Collector(), ChunkPolicy(fixed_hops=[15])))
    sch.begin_utterance("b", 0)
    sch.add_tokens("b", 0, list(range(100)))
    sch.step_once()
    assert runner.calls[-1][0][1] == 18                # b's first chunk went before a's second


def test_the_llm_is_held_exactly_while_a_call_makes_a_first_audio():
    events = []

    class Recording(FakeRunner):
        fail = False

        def run(self, items, between=None):
            events.append([int(it.tokens.shape[0]) for it in items])
            if self.fail:
                raise RuntimeError("out of memory")
            return super().run(items, between)
    runner = Recording()
    sch = Scheduler(runner, SchedulerConfig(max_batch=1), clock=lambda: 0.0, hold_llm=events.append)
    for sid in "ab":
        sch.open(StreamSpec(sid, _prompt(), Collector(), ChunkPolicy(fixed_hops=[15])))
        sch.begin_utterance(sid, 0)
        sch.add_tokens(sid, 0, list(range(36)))
    while sch.step_once():
        pass
    # a's and b's first audio held the LLM; their second chunks did not
    assert events == [True, [18], False, True, [18], False, [33], [33]]
    events.clear()
    runner.fail = True
    sch.open(StreamSpec("c", _prompt(), Collector(), ChunkPolicy(fixed_hops=[15])))
    sch.begin_utterance("c", 0)
    sch.add_tokens("c", 0, list(range(18)))
    sch.step_once()
    assert events == [True, [18], False]            # a failed call still drops the hold


class ArrivalDuringCall(FakeRunner):
    """On the call after ``arrive`` is set, runs ``arrive()`` (new tokens posted) before its Euler steps."""

    arrive = None

    def run(self, items, between=None):
        if self.arrive is not None:
            self.arrive, arrive = None, self.arrive
            arrive()
        return super().run(items, between)


@pytest.mark.parametrize("preempt", [True, False])
def test_a_first_chunk_ready_during_a_long_call_runs_between_its_euler_steps(preempt):
    delivered = []

    def arrive():
        sch.open(StreamSpec("b", _prompt(), delivered.append, ChunkPolicy(fixed_hops=[15])))
        sch.begin_utterance("b", 0)
        sch.add_tokens("b", 0, list(range(18)))

    runner = ArrivalDuringCall()
    sch = Scheduler(runner, SchedulerConfig(preempt=preempt), clock=lambda: 0.0)
    sch.open(StreamSpec("a", _prompt(), delivered.append, ChunkPolicy(fixed_hops=[15, 50])))
    sch.begin_utterance("a", 0)
    sch.add_tokens("a", 0, list(range(100)))
    sch.step_once()                                      # a's first chunk (it leads: no preemption)
    runner.arrive = arrive
    sch.step_once()                                      # a's second chunk; b's tokens arrive during it
    if preempt:
        # b's first chunk ran inside a's call, has its own record, and was delivered first
        assert [[n for _, n in call] for call in runner.calls] == [[18], [68], [18]]
        assert [r.stream_ids for r in sch.steps] == [["a"], ["b"], ["a"]]
        assert [c.stream_id for c in delivered] == ["a", "b", "a"]
        assert sch.steps[2].phases["preempted"] > 0
    else:
        assert [c.stream_id for c in delivered] == ["a", "a"]
        sch.step_once()
        assert [[n for _, n in call] for call in runner.calls] == [[18], [68], [18]]
        assert [c.stream_id for c in delivered] == ["a", "a", "b"]


# ---------------------------------------------------------------- real flow + HiFT (golden tiny-s1 weights)
# Tolerances. The flow mel of a chunk matches the golden/stand-alone mel within 1e-4 (README §11:
# observed ~2e-6). HiFT turns mel into f0 and integrates f0 into the sine phase, and the tiny golden
# f0 head has large weights (x100), so a 2e-6 mel difference moves the waveform by up to ~1.3e-3;
# the audio is therefore compared with AUDIO_ATOL (max) and AUDIO_MEAN_ATOL (mean abs).
MEL_ATOL = 1e-4
AUDIO_ATOL = 5e-3
AUDIO_MEAN_ATOL = 2e-4

import functools
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent.parent / "shared" / "golden" / "tiny-s1"


@functools.lru_cache(maxsize=1)
def _golden_models():
    from engine.models import load_models
    return load_models(GOLDEN / "model", "cpu", "float32", load_llm=False)


@functools.lru_cache(maxsize=1)
def _token2wav_cases():
    return torch.load(GOLDEN / "cases" / "token2wav.pt", map_location="cpu", weights_only=True)


class RecordingFlow:
    """Passes calls to the real flow and records each row's mel and arguments."""

    def __init__(self, flow):
        self.flow, self.rows = flow, []

    def __getattr__(self, name):      # prefix_frames, record_prefix, ...
        return getattr(self.flow, name)

    def inference_batch(self, tokens, prompt_tokens, prompt_feats, embeddings, streaming, finalize, **kw):
        mels = self.flow.inference_batch(tokens, prompt_tokens, prompt_feats, embeddings, streaming, finalize, **kw)
        for i, mel in enumerate(mels):
            self.rows.append(dict(n=int(tokens[i].numel()), streaming=streaming[i], finalize=finalize[i], mel=mel))
        return mels


def _runner(flow=None, hift=None, prefix_voices: int = 0):
    from engine.flow.prefix import PrefixStore, VoicePrefixCache
    from engine.streaming.runner import BatchedToken2Wav
    m = _golden_models()
    flow = flow or m.flow
    cache = None
    if prefix_voices:
        cache = VoicePrefixCache(PrefixStore(flow.decoder.estimator, prefix_voices, frames=100, steps=10))
    return BatchedToken2Wav(flow, hift or m.hift, prefix_cache=cache)


def _run_streams(runner, streams: dict, max_batch=8):
    """streams: id -> (FlowPrompt, tokens, hops, seeds-or-None, seed). Returns id -> list[ChunkOut]."""
    sch = Scheduler(runner, SchedulerConfig(max_batch=max_batch), clock=lambda: 0.0)
    outs = {sid: [] for sid in streams}
    for sid, (fp, tokens, hops, call_seeds, seed) in streams.items():
        sch.open(StreamSpec(sid, fp, outs[sid].append, ChunkPolicy(fixed_hops=hops), seed=seed, call_seeds=call_seeds))
        sch.begin_utterance(sid, 0)
        sch.add_tokens(sid, 0, tokens)
        sch.end_utterance(sid, 0)
        sch.end_stream(sid)
    while sch.step_once():
        pass
    return outs, sch


def _case_prompt(case) -> FlowPrompt:
    return FlowPrompt(case["prompt_token"][0].long(), case["prompt_feat"][0], case["embedding"][0])


def _golden_schedules():
    data = _token2wav_cases()
    return [(k, name) for k, case in enumerate(data["cases"]) for name in case["schedules"]]


@pytest.mark.parametrize("k,name", _golden_schedules())
def test_scheduler_reproduces_golden_token2wav_schedule(k, name, one_thread):
    case = _token2wav_cases()["cases"][k]
    calls = case["schedules"][name]["calls"]
    # the hop list that generated the schedule: first hop, then each later non-final hop
    hops = [c["token_end"] - 3 - c["token_offset"] for c in calls[:-1]] or [10**6]
    flow = RecordingFlow(_golden_models().flow)
    outs, _ = _run_streams(_runner(flow), {"g": (_case_prompt(case), case["token"][0].tolist(), hops,
                                                 [c["seed"] for c in calls], None)})
    chunks = outs["g"]
    assert len(chunks) == len(calls) == len(flow.rows)
    for j, (chunk, call, row) in enumerate(zip(chunks, calls, flow.rows)):
        assert row["n"] == call["token_end"]
        assert (row["streaming"], row["finalize"]) == (call["stream"], call["finalize"])
        want_mel = call["flow_mel"][0]
        assert row["mel"].shape == want_mel.shape
        assert (row["mel"] - want_mel).abs().max().item() <= MEL_ATOL, f"call {j} mel"
        want = call["speech"][0].numpy()
        assert chunk.samples.shape == want.shape, f"call {j}: {chunk.samples.shape} vs {want.shape}"
        diff = np.abs(chunk.samples - want)
        assert diff.max() <= AUDIO_ATOL and diff.mean() <= AUDIO_MEAN_ATOL, f"call {j}: {diff.max()} {diff.mean()}"
        assert chunk.final_of_utterance == call["finalize"] and chunk.final == call["finalize"]
    assert sum(len(c.samples) for c in chunks) == case["schedules"][name]["total_samples"]


def _four_streams(long_prompts: bool = False):
    """Golden token2wav cases (prompts of 7 and 17 tokens), or with two voices of 60 and 75 random
    prompt tokens instead (100 voice-only frames each: what the prefix cache serves)."""
    cases = _token2wav_cases()["cases"]
    g = torch.Generator().manual_seed(5)
    long_voices = [FlowPrompt(torch.randint(0, 6561, (p,), generator=g), torch.randn(2 * p, 80, generator=g),
                              torch.randn(192, generator=g)) for p in (60, 75)]
    streams = {}
    for i in range(4):
        case = cases[i % 2]
        tokens = case["token"][0].long()
        if i >= 2:  # different lengths and contents from the golden ones
            tokens = torch.roll(tokens, 7 * i)[:40 + 3 * i]
        prompt = long_voices[i % 2] if long_prompts else _case_prompt(case)
        streams[f"s{i}"] = (prompt, tokens.tolist(), [15, 20 + i], None, 100 + i)
    return streams


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_batching_independence_four_streams_vs_alone(prefix_cache, one_thread):
    """With the prefix cache too: two voices whose cached frames are read by rows of both."""
    streams = _four_streams(long_prompts=prefix_cache)
    voices = 2 if prefix_cache else 0
    flow = RecordingFlow(_golden_models().flow)
    runner = _runner(flow, prefix_voices=voices)
    together, sch = _run_streams(runner, streams)
    assert max(r.batch for r in sch.steps) == 4                 # they really shared calls
    assert len(runner.prefix_cache._slots if prefix_cache else []) == voices
    mels_together = flow.rows
    for sid in streams:
        flow_alone = RecordingFlow(_golden_models().flow)
        alone, sch1 = _run_streams(_runner(flow_alone, prefix_voices=voices), {sid: streams[sid]})
        assert all(r.batch == 1 for r in sch1.steps)
        a = np.concatenate([c.samples for c in alone[sid]])
        b = np.concatenate([c.samples for c in together[sid]])
        assert [len(c.samples) for c in alone[sid]] == [len(c.samples) for c in together[sid]]
        diff = np.abs(a - b)
        assert diff.max() <= AUDIO_ATOL and diff.mean() <= AUDIO_MEAN_ATOL, (sid, diff.max(), diff.mean())
        for ra in flow_alone.rows:   # the same call's mel appears in the batched run
            assert any(rb["n"] == ra["n"] and rb["mel"].shape == ra["mel"].shape
                       and (rb["mel"] - ra["mel"]).abs().max().item() <= MEL_ATOL for rb in mels_together)


class FrameLocalVocoder(torch.nn.Module):
    """A deterministic stand-in for HiFT: each mel frame -> 480 samples of one value (its mean),
    so any lost, duplicated or misplaced sample shows up exactly."""
    samples_per_frame = 480

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def inference(self, mel, mel_lens=None, cache_source=None, generators=None):
        speech = torch.tanh(mel.mean(1)).repeat_interleave(480, dim=1)
        for i, n in enumerate(mel_lens or []):
            speech[i, n * 480:] = 0
        return speech, speech[:, None].clone()


def test_chunk_joins_lose_or_duplicate_no_sample(one_thread):
    from engine.token2wav import SOURCE_CACHE_LEN, speech_window
    case = _token2wav_cases()["cases"][1]
    tokens = case["token"][0].tolist()
    flow = RecordingFlow(_golden_models().flow)
    outs, _ = _run_streams(_runner(flow, FrameLocalVocoder()),
                           {"j": (_case_prompt(case), tokens, [15, 11, 17], None, 0)})
    chunks = outs["j"]
    assert len(chunks) >= 4
    streamed = np.concatenate([c.samples for c in chunks])
    assert len(streamed) == len(tokens) * 960                      # nothing lost or duplicated
    # The non-streaming result of the same mel: every new frame of every call, vocoded at once.
    offsets = [0] + [r["n"] - 3 for r in flow.rows[:-1]]
    mel = torch.cat([r["mel"][:, 2 * off:] for r, off in zip(flow.rows, offsets)], dim=1)
    assert mel.shape[1] == 2 * len(tokens)
    offline = FrameLocalVocoder().inference(mel[None])[0][0].numpy()
    # Documented fade behaviour: at each join (3840 samples before the end of every non-final
    # chunk's audio) the held-back tail and the re-vocoded head are mixed with the two halves of a
    # Hamming(7680) window, i.e. scaled by w[n] + w[n + 3840] (about 1.08); elsewhere identical.
    gain = np.ones(len(offline))
    w = speech_window()
    join = 0
    for c in chunks[:-1]:
        join += len(c.samples)
        gain[join:join + SOURCE_CACHE_LEN] = w[:SOURCE_CACHE_LEN] + w[SOURCE_CACHE_LEN:]
    np.testing.assert_allclose(streamed, (offline * gain).astype(np.float32), atol=1e-6)


def test_bucket_padding_of_the_flow_estimator_is_exact(one_thread):
    """The CUDA-graph wrapper pads rows and frames to a bucket; on CPU the same padding path runs
    without capture, and the mels must equal the unpadded call's."""
    import copy

    from engine.streaming.cuda_graphs import GraphedEstimator
    flow = _golden_models().flow
    case = _token2wav_cases()["cases"][0]
    args = ([case["token"][0, :30].long(), case["token"][0, :21].long()],
            [case["prompt_token"][0].long()] * 2, [case["prompt_feat"][0]] * 2,
            case["embedding"].repeat(2, 1), [True, False], [False, True])
    want = flow.inference_batch(*args)
    padded = copy.deepcopy(flow)
    wrapper = GraphedEstimator(padded.decoder.estimator, rows=[8], frames=[128], max_elements=10**6,
                               use_graphs=False)
    padded.decoder.estimator = wrapper
    got = padded.inference_batch(*args)
    assert wrapper.eager_calls == 0 and wrapper.padded_calls == 10     # 4 rows -> 8, 74 frames -> 128
    assert wrapper.padded_shape(4, 74) == (8, 128) and wrapper.padded_shape(9, 74) == (9, 74)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max().item() <= MEL_ATOL
    small = GraphedEstimator(copy.deepcopy(flow.decoder.estimator), rows=[2], frames=[64], max_elements=10**6,
                             use_graphs=False)
    padded.decoder.estimator = small
    padded.inference_batch(*args)
    assert small.eager_calls == 10 and small.padded_calls == 0         # outside every bucket: eager


def test_graph_buckets_share_one_set_of_static_buffers():
    """Every captured bucket's inputs and output are views of the same flat buffers (one call runs at
    a time), sized by the largest bucket within max_elements."""
    from engine.streaming.cuda_graphs import GraphedEstimator
    est = GraphedEstimator(torch.nn.Identity(), rows=[2, 4, 8], frames=[128, 256], max_elements=1024)
    a = est._static_views(8, 128, 80, 80, torch.bfloat16, torch.device("cpu"), prefixed=True)
    b = est._static_views(4, 256, 80, 80, torch.bfloat16, torch.device("cpu"), prefixed=True)
    assert a["x"].shape == (8, 80, 128) and b["x"].shape == (4, 80, 256) and b["out"].shape == (4, 80, 256)
    assert a["t"].dtype == torch.float32 and a["streaming"].dtype == torch.bool and a["cond"].dtype == torch.bfloat16
    assert a["past_rows"].dtype == torch.long and a["past_frames"].shape == (8,)
    assert "past_rows" not in est._static_views(2, 128, 80, 80, torch.bfloat16, torch.device("cpu"), prefixed=False)
    for k in a:
        assert a[k].data_ptr() == b[k].data_ptr() and a[k].is_contiguous()
    flat = est._static[(torch.bfloat16, torch.device("cpu"))]
    assert flat["x"].numel() == 1024 * 80 and flat["t"].numel() == 8     # 8 x 256 is not a graph bucket


def test_a_failing_call_fails_its_streams_and_the_worker_goes_on():
    class Flaky(FakeRunner):
        def run(self, items, between=None):
            if any(int(it.tokens.shape[0]) == 33 for it in items):
                raise RuntimeError("out of memory")
            return super().run(items, between)

    sch = Scheduler(Flaky(), SchedulerConfig(max_batch=1), clock=lambda: 0.0)
    bad, good = Collector(), Collector()
    sch.open(StreamSpec("bad", _prompt(), bad, ChunkPolicy(fixed_hops=[15])))
    sch.begin_utterance("bad", 0)
    sch.add_tokens("bad", 0, list(range(40)))        # its second call (token_end 33) fails
    while sch.step_once():
        pass
    assert bad.chunks[-1] is None and "bad" not in sch._streams and isinstance(sch.error, RuntimeError)
    sch.open(StreamSpec("good", _prompt(), good, ChunkPolicy(fixed_hops=[15])))
    sch.begin_utterance("good", 0)
    sch.add_tokens("good", 0, list(range(20)))
    sch.end_utterance("good", 0)
    sch.end_stream("good")
    while sch.step_once():
        pass
    assert good.chunks[-1].final and sum(len(c.samples) for c in good.chunks) == 20 * 960
