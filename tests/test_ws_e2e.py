"""End to end on CPU: the real TTSEngine with the tiny random checkpoint behind a real server on
127.0.0.1, driven over WebSocket. With random weights the LLM never stops by itself, so the engine
runs with ``fixed_tokens_per_char``: every segment gets ceil(len(text) * TOKENS_PER_CHAR) speech
tokens, i.e. 960 samples each at 24 kHz — which makes the expected audio length exact."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import uvloop

from protocol import messages as m
from tests.fakes import Client, running_server, wav_bytes
from ws_server.audio import BYTES_PER_SAMPLE, decode_bytes

TOKENS_PER_CHAR = 1.0
SAMPLES_PER_TOKEN = 960


@pytest.fixture(scope="module")
def loop():
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def engine(loop, tiny_model_dir, tmp_path_factory):
    from engine.engine import EngineConfig, TTSEngine
    cfg = EngineConfig.load(None, model_dir=str(tiny_model_dir), device="cpu", seed=0,
                            fixed_tokens_per_char=TOKENS_PER_CHAR,
                            voices_dir=str(tmp_path_factory.mktemp("voices")))
    eng = TTSEngine(cfg)
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.close())


@pytest.fixture(scope="module")
def server(loop, engine):
    cm = running_server(engine, max_contexts_per_connection=8)
    srv = loop.run_until_complete(cm.__aenter__())

    async def register():
        async with Client.connect(srv) as c:
            await c.send(m.VoiceRegister("alice", "Hello, this is a prompt.", wav_bytes(2.0, 16000)))
            return await c.recv(120)
    reply = loop.run_until_complete(register())
    assert isinstance(reply, m.VoiceRegistered), reply
    assert reply.voice.voice_id == "alice" and reply.voice.prompt_seconds == pytest.approx(2.0, abs=0.01)
    yield srv
    loop.run_until_complete(cm.__aexit__(None, None, None))


def expected_samples(segments: list[str], rate: int = 24000) -> int:
    n = SAMPLES_PER_TOKEN * sum(math.ceil(len(s) * TOKENS_PER_CHAR) for s in segments)
    return round(n * rate / 24000)


def of(msgs, cid, kind=None):
    return [x for x in msgs if getattr(x, "context_id", None) == cid and (kind is None or isinstance(x, kind))]


def check_context(msgs, cid, encoding="pcm_s16le", rate=24000, exact=True) -> np.ndarray:
    """Order and length invariants of one finished context; returns its decoded samples.

    ``exact=False`` (bistream): the engine caps the token count at the fixed ratio but the random
    LLM may stop earlier, so the length must be a whole number of tokens up to the cap."""
    mine = of(msgs, cid)
    assert isinstance(mine[0], m.Started) and isinstance(mine[-1], m.Done), [type(x).__name__ for x in mine]
    audio = of(msgs, cid, m.Audio)
    segments = [x.text for x in of(msgs, cid, m.Segment)]
    assert segments and audio
    assert [a.seq for a in audio] == list(range(len(audio)))
    assert [a.final for a in audio] == [False] * (len(audio) - 1) + [True]
    assert all(a.encoding == encoding and a.sample_rate == rate for a in audio)
    data = b"".join(a.audio for a in audio)
    assert len(data) % BYTES_PER_SAMPLE[encoding] == 0
    samples = decode_bytes(data, encoding)
    done = mine[-1]
    if exact:
        assert len(samples) == expected_samples(segments, rate)
        assert done.audio_seconds == pytest.approx(expected_samples(segments) / 24000)
    else:
        tokens = round(done.audio_seconds * 24000 / SAMPLES_PER_TOKEN)
        assert done.audio_seconds * 24000 == pytest.approx(tokens * SAMPLES_PER_TOKEN)
        assert 1 <= tokens <= expected_samples(segments) // SAMPLES_PER_TOKEN
        assert len(samples) == round(tokens * SAMPLES_PER_TOKEN * rate / 24000)
    assert done.time_to_first_audio_s is not None and 0 < done.time_to_first_audio_s < done.wall_seconds
    assert np.all(np.isfinite(samples)) and np.max(np.abs(samples)) > 0
    return samples


def test_streamed_text_end_to_end(loop, server, engine):
    async def scenario():
        async with Client.connect(server) as c:
            await c.send(m.Start("a", voice_id="alice"))
            for piece in ["Hello the", "re, how are", " you today? I am", " fine, thanks."]:
                await c.send(m.Text("a", piece))
                await asyncio.sleep(0.05)
            await c.send(m.End("a"))
            return await c.until(lambda x: isinstance(x, (m.Done, m.Error)), timeout=120)
    msgs = loop.run_until_complete(scenario())
    check_context(msgs, "a")
    joined = " ".join(x.text for x in of(msgs, "a", m.Segment))
    assert "Hello" in joined and "thanks" in joined
    # every segment message precedes the audio that voices it
    first_audio_of = {}
    for i, x in enumerate(msgs):
        if isinstance(x, m.Audio):
            first_audio_of.setdefault(x.segment_index, i)
    seg_pos = {x.index: i for i, x in enumerate(msgs) if isinstance(x, m.Segment)}
    assert all(seg_pos[k] < v for k, v in first_audio_of.items())
    assert engine.metrics()["live_streams"] == 0


def test_two_contexts_on_one_socket_and_an_inline_prompt(loop, server):
    async def scenario():
        async with Client.connect(server) as c:
            await c.send(m.Start("x", voice_id="alice", text="The first context speaks."))
            await c.send(m.Start("y", prompt=m.Prompt("A prompt.", wav_bytes(1.5, 24000)), encoding="pcm_f32le",
                                 text="And the second one too."))
            await c.send(m.End("x"))
            await c.send(m.End("y"))
            done = set()
            msgs = []
            while done != {"x", "y"}:
                msgs += await c.until(lambda x: isinstance(x, (m.Done, m.Error)), timeout=120)
                assert isinstance(msgs[-1], m.Done), msgs[-1]
                done.add(msgs[-1].context_id)
            return msgs
    msgs = loop.run_until_complete(scenario())
    check_context(msgs, "x")
    check_context(msgs, "y", "pcm_f32le")


def test_flush_releases_buffered_text_before_end(loop, server):
    async def scenario():
        async with Client.connect(server) as c:
            await c.send(m.Start("f", voice_id="alice", text="no punctuation here yet"))
            await c.send(m.Flush("f"))
            before_end = await c.until(lambda x: isinstance(x, m.Audio) and x.context_id == "f", timeout=60)
            await c.send(m.Text("f", " and more."))
            await c.send(m.End("f"))
            rest = await c.until(lambda x: isinstance(x, (m.Done, m.Error)), timeout=120)
            return before_end, before_end + rest
    before_end, msgs = loop.run_until_complete(scenario())
    assert [x.text for x in of(before_end, "f", m.Segment)] == ["no punctuation here yet"]
    check_context(msgs, "f")


def test_cancel_mid_stream_stops_audio_and_frees_the_engine_stream(loop, server, engine):
    async def scenario():
        async with Client.connect(server) as c:
            await c.send(m.Start("long", voice_id="alice", first_chunk_tokens=5,
                                 text="This is a rather long sentence that would take many seconds to voice."))
            await c.send(m.End("long"))
            await c.until(lambda x: isinstance(x, m.Audio) and x.context_id == "long", timeout=60)
            await c.send(m.Cancel("long"))
            msgs = await c.until(lambda x: isinstance(x, m.Cancelled), timeout=30)
            assert msgs[-1] == m.Cancelled("long")
            assert not any(isinstance(x, m.Done) for x in msgs)
            # the socket goes on; nothing of the cancelled context arrives any more
            await c.send(m.Start("next", voice_id="alice", text="Short."))
            await c.send(m.End("next"))
            after = await c.until(lambda x: isinstance(x, (m.Done, m.Error)) and x.context_id == "next", timeout=60)
            assert not of(after, "long")
            return after
    after = loop.run_until_complete(scenario())
    check_context(after, "next")
    metrics = engine.metrics()
    assert metrics["live_streams"] == 0
    assert server.metrics.contexts == 0 and server.metrics.contexts_cancelled_total >= 1


def test_client_disconnect_cancels_the_engine_stream_and_leaks_no_tasks(loop, server, engine):
    async def scenario():
        baseline = len(asyncio.all_tasks())
        async with Client.connect(server) as c:
            await c.send(m.Start("d", voice_id="alice", first_chunk_tokens=5,
                                 text="Another long sentence that the client will not wait for at all."))
            await c.send(m.End("d"))
            await c.until(lambda x: isinstance(x, m.Audio), timeout=60)
        for _ in range(200):
            if not server.sessions and engine.metrics()["live_streams"] == 0 and len(asyncio.all_tasks()) <= baseline:
                break
            await asyncio.sleep(0.02)
        return baseline, len(asyncio.all_tasks())
    baseline, now = loop.run_until_complete(scenario())
    assert not server.sessions and server.metrics.contexts == 0
    assert engine.metrics()["live_streams"] == 0
    assert now <= baseline


@pytest.mark.parametrize("bistream", [False, True], ids=["segments", "bistream"])
def test_every_encoding_and_several_sample_rates(loop, server, bistream):
    formats = [("pcm_s16le", 24000), ("pcm_s16le", 16000), ("pcm_f32le", 48000), ("pcm_f32le", 22050),
               ("mulaw", 8000), ("alaw", 8000), ("mulaw", 16000), ("alaw", 44100)]
    if bistream:
        formats = formats[:2] + formats[4:6]

    async def scenario():
        async with Client.connect(server) as c:
            for i, (enc, rate) in enumerate(formats):
                await c.send(m.Start(f"e{i}", voice_id="alice", encoding=enc, sample_rate=rate,
                                     input_mode="bistream" if bistream else "segments", text="Format check."))
                await c.send(m.End(f"e{i}"))
            msgs, done = [], 0
            while done < len(formats):
                msgs += await c.until(lambda x: isinstance(x, (m.Done, m.Error)), timeout=120)
                assert isinstance(msgs[-1], m.Done), msgs[-1]
                done += 1
            return msgs
    msgs = loop.run_until_complete(scenario())
    for i, (enc, rate) in enumerate(formats):
        samples = check_context(msgs, f"e{i}", enc, rate)
        assert np.max(np.abs(samples)) <= 1.0
