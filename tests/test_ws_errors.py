"""The WebSocket server against a fake engine: every error path, auth, limits, HTTP routes,
backpressure, disconnects and graceful shutdown (a real server on 127.0.0.1)."""
from __future__ import annotations

import asyncio

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocol import errors
from protocol import messages as m
from tests.fakes import Client, FakeEngine, http_get, running_server, wav_bytes


def run(coro):
    return asyncio.run(coro)


async def expect_error(c: Client, code: str, context_id: str | None = None) -> m.Error:
    """The next error (skipping stream messages: segment/audio of contexts still running)."""
    msg = await c.recv()
    while isinstance(msg, (m.Segment, m.Audio)):
        msg = await c.recv()
    assert isinstance(msg, m.Error), msg
    assert msg.code == code, msg
    assert msg.context_id == context_id
    return msg


async def raw(c: Client, **fields) -> None:
    await c.ws.send(msgpack.packb(fields, use_bin_type=True))


def test_malformed_frames_get_errors_and_the_connection_continues():
    async def scenario():
        async with running_server(FakeEngine(), max_frame_bytes=1000) as srv, Client.connect(srv) as c:
            await c.ws.send("{\"type\": \"start\"}")
            await expect_error(c, errors.BAD_FRAME)
            await c.ws.send(b"\xc1\xc1")
            await expect_error(c, errors.BAD_FRAME)
            await raw(c, type="speak", context_id="a")
            await expect_error(c, errors.UNKNOWN_TYPE, "a")
            await raw(c, type="text", context_id="a")
            await expect_error(c, errors.MISSING_FIELD, "a")
            await raw(c, type="start", context_id="a", sample_rate=100)
            await expect_error(c, errors.INVALID_FIELD, "a")
            await c.ws.send(msgpack.packb({"type": "text", "context_id": "a", "text": "x" * 1500}))
            await expect_error(c, errors.FRAME_TOO_LARGE)
            # still usable
            await c.send(m.VoiceList())
            assert isinstance(await c.recv(), m.Voices)
            # far above the limit: the WebSocket layer closes with 1009
            await c.ws.send(b"\x00" * 2500)
            with pytest.raises(ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd.code == errors.CloseCode.TOO_BIG
    run(scenario())


def test_context_state_errors():
    async def scenario():
        eng = FakeEngine(chunk_delay_s=0.05)
        async with running_server(eng, max_contexts_per_connection=2, max_text_bytes_per_context=20) as srv, \
                Client.connect(srv) as c:
            for msg in (m.Text("nope", "hi"), m.Flush("nope"), m.End("nope"), m.Cancel("nope")):
                await c.send(msg)
                await expect_error(c, errors.UNKNOWN_CONTEXT, "nope")
            await c.send(m.Start("a", voice_id="default"))
            assert await c.recv() == m.Started("a", "pcm_s16le", 24000)
            await c.send(m.Start("a", voice_id="default"))
            await expect_error(c, errors.CONTEXT_EXISTS, "a")
            await c.send(m.Start("d", voice_id="missing"))
            await expect_error(c, errors.VOICE_NOT_FOUND, "d")
            await c.send(m.Text("a", "x" * 21))
            await expect_error(c, errors.TEXT_TOO_LONG, "a")
            await c.send(m.Start("b", voice_id="default", text="y" * 21))
            await expect_error(c, errors.TEXT_TOO_LONG, "b")
            await c.send(m.Start("b", voice_id="default", text="Some words."))
            assert isinstance(await c.recv(), m.Started)
            await c.send(m.Start("c", voice_id="default"))
            await expect_error(c, errors.TOO_MANY_CONTEXTS, "c")
            await c.send(m.End("b"))
            await c.send(m.Text("b", "late"))
            msgs = await c.until(lambda x: isinstance(x, m.Error))
            assert msgs[-1].code == errors.CONTEXT_ENDED and msgs[-1].context_id == "b"
            await c.send(m.Flush("b"))
            msgs = await c.until(lambda x: isinstance(x, m.Error))
            assert msgs[-1].code == errors.CONTEXT_ENDED
            # the text refused for being too long never reached the engine
            assert all("x" not in t for s in eng.streams for t in s.pushed)
    run(scenario())


def test_engine_failures_become_context_errors_and_free_the_context():
    async def scenario():
        eng = FakeEngine()
        async with running_server(eng) as srv, Client.connect(srv) as c:
            for word in ("FAIL", "CRASH"):
                await c.send(m.Start("a", voice_id="default", text=f"Hello. {word} here."))
                msgs = await c.until(lambda x: isinstance(x, (m.Error, m.Done)))
                assert msgs[-1].code == errors.ENGINE_ERROR and msgs[-1].context_id == "a"
                assert any(isinstance(x, m.Audio) for x in msgs)   # the first segment was voiced
            await c.send(m.Start("a", voice_id="default", text="Fine.")) # the id is free again
            await c.send(m.End("a"))
            msgs = await c.until(lambda x: isinstance(x, (m.Error, m.Done)))
            assert isinstance(msgs[-1], m.Done)
    run(scenario())


def test_unexpected_server_faults_become_internal_errors():
    class Broken(FakeEngine):
        def list_voices(self):
            raise RuntimeError("boom")

    async def scenario():
        async with running_server(Broken()) as srv, Client.connect(srv) as c:
            await c.send(m.VoiceList())
            msg = await expect_error(c, errors.INTERNAL_ERROR)
            assert "boom" in msg.message
            await c.send(m.Start("a", voice_id="default", text="Still fine."))
            await c.send(m.End("a"))
            assert isinstance((await c.until(lambda x: isinstance(x, m.Done)))[-1], m.Done)
    run(scenario())


def test_not_ready_and_shutting_down_refuse_new_contexts():
    async def scenario():
        eng = FakeEngine(ready=False)
        async with running_server(eng) as srv:
            status, _, body = await http_get(srv.port, "/ready")
            assert status == 503
            async with Client.connect(srv) as c:
                await c.send(m.Start("a", voice_id="default"))
                await expect_error(c, errors.NOT_READY, "a")
                await eng.start()
                assert (await http_get(srv.port, "/ready"))[0] == 200
                srv.draining = True
                await c.send(m.Start("a", voice_id="default"))
                await expect_error(c, errors.SHUTTING_DOWN, "a")
                assert (await http_get(srv.port, "/ready"))[0] == 503
    run(scenario())


def test_too_many_errors_closes_with_policy_code():
    async def scenario():
        async with running_server(FakeEngine(), max_errors_per_connection=3) as srv, Client.connect(srv) as c:
            for _ in range(4):
                await c.ws.send(b"\xc1")
            codes = []
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    codes.append((await c.recv()).code)
            assert codes == [errors.BAD_FRAME] * 4 + [errors.TOO_MANY_ERRORS]
            assert info.value.rcvd.code == errors.CloseCode.POLICY
    run(scenario())


def test_idle_timeout_closes_only_idle_sockets():
    async def scenario():
        eng = FakeEngine(chunk_delay_s=0.05)
        async with running_server(eng, idle_timeout_s=0.3) as srv:
            async with Client.connect(srv) as busy:
                await busy.send(m.Start("a", voice_id="default", text="A sentence that takes a while."))
                await busy.send(m.End("a"))
                msgs = await busy.until(lambda x: isinstance(x, m.Done))   # ~1.5 s, longer than the timeout
                assert isinstance(msgs[-1], m.Done)
                await expect_error(busy, errors.IDLE_TIMEOUT)
                with pytest.raises(ConnectionClosed) as info:
                    await busy.recv()
                assert info.value.rcvd.code == errors.CloseCode.IDLE
    run(scenario())


def test_auth_accepts_header_and_token_and_refuses_others():
    async def scenario():
        async with running_server(FakeEngine(), api_keys=["k-one", "k-two"]) as srv:
            for kw in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}):
                with pytest.raises(InvalidStatus) as info:
                    async with Client.connect(srv, **kw):
                        pass
                assert info.value.response.status_code == 401
            with pytest.raises(InvalidStatus):
                async with Client.connect(srv, path="/v1/tts?token=k-on"):
                    pass
            async with Client.connect(srv, additional_headers={"Authorization": "Bearer k-two"}) as c:
                await c.send(m.VoiceList())
                assert isinstance(await c.recv(), m.Voices)
            async with Client.connect(srv, path="/v1/tts?token=k-one") as c:
                await c.send(m.VoiceList())
                assert isinstance(await c.recv(), m.Voices)
            assert (await http_get(srv.port, "/health"))[0] == 200   # probes need no key
            assert srv.metrics.connections_refused_total == 3
    run(scenario())


def test_connection_limit():
    async def scenario():
        async with running_server(FakeEngine(), max_connections=1) as srv, Client.connect(srv):
            with pytest.raises(InvalidStatus) as info:
                async with Client.connect(srv):
                    pass
            assert info.value.response.status_code == 503
    run(scenario())


def test_voice_management():
    async def scenario():
        eng = FakeEngine()
        async with running_server(eng, max_voices=2) as srv, Client.connect(srv) as c:
            await c.send(m.VoiceRegister("bob", "what bob says", wav_bytes(1.5)))
            reply = await c.recv()
            assert reply == m.VoiceRegistered(m.Voice("bob", "what bob says", 1.5, "zero_shot"))
            await c.send(m.VoiceRegister("bob", "again", wav_bytes(1.0)))
            await expect_error(c, errors.VOICE_EXISTS)
            await c.send(m.VoiceRegister("bob", "again", wav_bytes(1.0), overwrite=True))
            assert isinstance(await c.recv(), m.VoiceRegistered)
            await c.send(m.VoiceRegister("carol", "hi", wav_bytes(1.0)))
            await expect_error(c, errors.TOO_MANY_VOICES)
            await c.send(m.VoiceList())
            assert sorted(v.voice_id for v in (await c.recv()).voices) == ["bob", "default"]
            await c.send(m.VoiceDelete("bob"))
            assert await c.recv() == m.VoiceDeleted("bob")
            await c.send(m.VoiceDelete("bob"))
            await expect_error(c, errors.VOICE_NOT_FOUND)
            await c.send(m.VoiceRegister("dave", "hi", b"not audio at all"))
            await expect_error(c, errors.INVALID_AUDIO)
            await c.send(m.Start("x", voice_id="bob"))
            await expect_error(c, errors.VOICE_NOT_FOUND, "x")
    run(scenario())


def test_http_routes_and_metrics():
    async def scenario():
        async with running_server(FakeEngine()) as srv:
            async with Client.connect(srv) as c:
                await c.send(m.Start("a", voice_id="default", text="Hi there."))
                await c.send(m.End("a"))
                await c.until(lambda x: isinstance(x, m.Done))
                status, headers, body = await http_get(srv.port, "/metrics")
                assert status == 200 and headers["content-type"].startswith("text/plain")
                text = body.decode()
                assert "cosy_sessions 1" in text and "cosy_contexts_total 1" in text
                assert 'cosy_time_to_first_audio_seconds_bucket{le="+Inf"} 1' in text
                assert "cosy_engine_live_streams 0" in text and "cosy_underruns_total" in text
            assert (await http_get(srv.port, "/health"))[:1] == (200,)
            status, headers, body = await http_get(srv.port, "/")
            assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in body.lower()
            for path in ("/app.js", "/msgpack.js"):
                status, headers, _ = await http_get(srv.port, path)
                assert status == 200 and "javascript" in headers["content-type"]
            for path in ("/nope.html", "/../configs/server.yaml", "/%2e%2e/README.md"):
                assert (await http_get(srv.port, path))[0] == 404
    run(scenario())


async def settled(stream, quiet_s: float = 0.3, timeout: float = 20.0) -> int:
    """The stream's chunk count once it has stopped growing for ``quiet_s``."""
    last = -1
    async with asyncio.timeout(timeout):
        while stream.chunks != last:
            last = stream.chunks
            await asyncio.sleep(quiet_s)
    return last


def test_slow_reader_pauses_only_its_own_streams():
    async def scenario():
        eng = FakeEngine(chunk_tokens=10, chunk_delay_s=0.001)
        async with running_server(eng, send_queue_bytes=64 * 1024) as srv:
            async with Client.connect(srv, max_queue=1) as slow, Client.connect(srv) as fast:
                await slow.send(m.Start("s", voice_id="default", encoding="pcm_f32le", text="x" * 6000 + "."))
                await slow.send(m.End("s"))
                assert isinstance(await slow.recv(), m.Started)
                total = 601   # chunks the slow stream would make if nothing held it back
                s_stream = eng.streams[0]
                stalled_at = await settled(s_stream)          # it fills the socket buffers, then stalls
                assert stalled_at < total
                _, _, body = await http_get(srv.port, "/metrics")
                queued = int(body.decode().split("\ncosy_send_queue_bytes ")[1].split()[0])
                assert queued >= 64 * 1024                    # the stalled socket's queue is full
                await fast.send(m.Start("f", voice_id="default", text="A quick one. And another."))
                await fast.send(m.End("f"))
                msgs = await fast.until(lambda x: isinstance(x, m.Done), timeout=10)
                assert isinstance(msgs[-1], m.Done) and msgs[-1].audio_seconds > 0
                assert s_stream.chunks - stalled_at <= 3      # still paused while the fast one ran
                assert srv.queued_bytes() <= 64 * 1024 + 40_000
                # reading drains it and the stream runs to the end
                msgs = await slow.until(lambda x: isinstance(x, m.Done), timeout=60)
                assert s_stream.chunks == total
    run(scenario())


def test_client_disconnect_cancels_streams_and_leaks_no_tasks():
    async def scenario():
        eng = FakeEngine(chunk_delay_s=0.02)
        async with running_server(eng) as srv:
            baseline = len(asyncio.all_tasks())
            async with Client.connect(srv) as c:
                await c.send(m.Start("a", voice_id="default", text="A long sentence to speak here. " * 5))
                await c.send(m.Start("b", voice_id="default", text="Another one. " * 5))
                await c.until(lambda x: isinstance(x, m.Audio))
                await c.send(m.VoiceRegister("v", "hi", wav_bytes(0.5)))
            for _ in range(250):
                if not srv.sessions and not eng.live and len(asyncio.all_tasks()) <= baseline:
                    break
                await asyncio.sleep(0.02)
            assert all(s.cancelled for s in eng.streams)
            assert not eng.live and not srv.sessions
            assert srv.metrics.contexts == 0 and srv.metrics.connections == 0
            assert len(asyncio.all_tasks()) <= baseline, asyncio.all_tasks()
    run(scenario())


def test_cancel_drops_queued_audio_and_nothing_follows_cancelled():
    async def scenario():
        eng = FakeEngine(chunk_delay_s=0.01)
        async with running_server(eng) as srv, Client.connect(srv) as c:
            await c.send(m.Start("a", voice_id="default", text="word " * 200 + "."))
            await c.send(m.Start("b", voice_id="default", text="Short one."))
            await c.until(lambda x: isinstance(x, m.Audio) and x.context_id == "a")
            await c.send(m.Cancel("a"))
            msgs = await c.until(lambda x: isinstance(x, m.Cancelled))
            assert msgs[-1] == m.Cancelled("a")
            chunks_at_cancel = eng.streams[0].chunks
            await c.send(m.End("b"))
            after = await c.until(lambda x: isinstance(x, m.Done) and x.context_id == "b")
            assert not [x for x in after if getattr(x, "context_id", None) == "a"]
            assert eng.streams[0].cancelled and eng.streams[0].chunks == chunks_at_cancel
            assert not eng.live and srv.metrics.contexts == 0
            await c.send(m.Text("a", "more"))
            await expect_error(c, errors.UNKNOWN_CONTEXT, "a")
    run(scenario())


def test_graceful_shutdown_finishes_or_cancels_within_the_deadline():
    async def scenario():
        eng = FakeEngine(chunk_delay_s=0.02)
        async with running_server(eng) as srv:
            port = srv.port
            async with Client.connect(srv) as quick, Client.connect(srv) as slow:
                await quick.send(m.Start("q", voice_id="default", text="Hi."))
                await quick.send(m.End("q"))
                await slow.send(m.Start("s", voice_id="default", text="word " * 1000 + "."))   # ~10 s of work
                await slow.until(lambda x: isinstance(x, m.Audio))
                await srv.shutdown(deadline_s=2.0)
                assert isinstance((await quick.until(lambda x: isinstance(x, m.Done)))[-1], m.Done)
                msgs = await slow.until(lambda x: isinstance(x, m.Cancelled))
                assert msgs[-1] == m.Cancelled("s")
                with pytest.raises(ConnectionClosed) as info:
                    await slow.recv()
                assert info.value.rcvd.code == errors.CloseCode.GOING_AWAY
            assert not eng.live
            with pytest.raises(OSError):
                await http_get(port, "/health")
    run(scenario())
