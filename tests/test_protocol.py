"""Protocol v1 codec, audio encoding, config, auth and send-queue units (no server, no engine)."""
from __future__ import annotations

import asyncio
import re
import warnings
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec, errors
from protocol import messages as m
from ws_server import auth
from ws_server.audio import (BYTES_PER_SAMPLE, AudioEncoder, alaw2lin, decode_bytes, float_to_s16, lin2alaw,
                             lin2ulaw, ulaw2lin)
from ws_server.config import ServerConfig, load_config
from ws_server.context import PlaybackClock
from ws_server.outbox import Outbox

REPO = Path(__file__).resolve().parent.parent

CLIENT_EXAMPLES = [
    m.Start("c1", voice_id="alice", encoding="mulaw", sample_rate=8000, speed=1.25, text="Hi"),
    m.Start("c2", prompt=m.Prompt("prompt words", b"RIFF\x00\x01"), mode="instruct2", instruct_text="calm",
            input_mode="bistream", text_normalization=False, first_chunk_tokens=10),
    m.Text("c1", "Hello, wor"), m.Flush("c1"), m.End("c1"), m.Cancel("c1"),
    m.VoiceRegister("bob", "what bob says", b"\x00\xff" * 10, overwrite=True), m.VoiceList(), m.VoiceDelete("bob"),
]
SERVER_EXAMPLES = [
    m.Started("c1", "pcm_s16le", 24000), m.Segment("c1", 0, "Hello."),
    m.Audio("c1", 3, b"\x01\x02\x03\x04", "pcm_s16le", 24000, 0, "Hello.", False),
    m.Done("c1", 0.21, 2.4, 3.0, 0.3, 0), m.Done("c2", None, 0.0, 0.1, None, 0), m.Cancelled("c1"),
    m.Error("unknown_context", "no live context 'x'", "x"), m.Error("bad_frame", "nope"),
    m.VoiceRegistered(m.Voice("bob", "what bob says", 3.5)), m.Voices([m.Voice("a", "t", 1.0, "sft")]),
    m.VoiceDeleted("bob"),
]


def pack(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def refused(data: bytes) -> errors.ProtocolError:
    with pytest.raises(errors.ProtocolError) as info:
        codec.decode_client(data)
    return info.value


# ------------------------------------------------------------------ codec

@pytest.mark.parametrize("msg", CLIENT_EXAMPLES, ids=lambda x: x.TYPE)
def test_client_round_trip(msg):
    assert codec.decode_client(codec.encode(msg)) == msg


@pytest.mark.parametrize("msg", SERVER_EXAMPLES, ids=lambda x: x.TYPE)
def test_server_round_trip(msg):
    assert codec.decode_server(codec.encode(msg)) == msg


def test_wire_form_is_a_map_with_type_and_raw_binary_audio():
    raw = msgpack.unpackb(codec.encode(SERVER_EXAMPLES[2]), raw=True)
    assert raw[b"type"] == b"audio" and raw[b"context_id"] == b"c1"
    assert isinstance(raw[b"audio"], bytes) and raw[b"audio"] == b"\x01\x02\x03\x04"
    # bin, not str: with raw=False strings decode to str but audio stays bytes
    assert isinstance(msgpack.unpackb(codec.encode(SERVER_EXAMPLES[2]), raw=False)["audio"], bytes)
    assert list(msgpack.unpackb(codec.encode(m.Text("a", "b")), raw=False))[0] == "type"


def test_defaults_fill_optional_fields():
    msg = codec.decode_client(pack(type="start", context_id="x"))
    assert msg == m.Start("x")
    assert (msg.encoding, msg.sample_rate, msg.mode, msg.input_mode) == ("pcm_s16le", 24000, "zero_shot", "segments")


@pytest.mark.parametrize("data,code", [
    (b"\xc1", errors.BAD_FRAME),
    (b"\x92\x01\x02", errors.BAD_FRAME),                       # an array
    (msgpack.packb("start"), errors.BAD_FRAME),
    (pack(context_id="a"), errors.UNKNOWN_TYPE),
    (pack(type="speak", context_id="a"), errors.UNKNOWN_TYPE),
    (pack(type=5), errors.UNKNOWN_TYPE),
    (pack(type="audio", context_id="a"), errors.UNKNOWN_TYPE),  # server message sent by a client
    (pack(type="text", context_id="a"), errors.MISSING_FIELD),
    (pack(type="start"), errors.MISSING_FIELD),
    (pack(type="voice.register", voice_id="v", prompt_text="t"), errors.MISSING_FIELD),
    (pack(type="text", context_id="a", text=5), errors.INVALID_FIELD),
    (pack(type="text", context_id="a", text="x", extra=1), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", sample_rate="24000"), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", sample_rate=True), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", sample_rate=7999), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", sample_rate=48001), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", speed=0.4), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", speed=2.5), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", first_chunk_tokens=4), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", encoding="mp3"), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", mode="clone"), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", input_mode="words"), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", text_normalization=1), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", mode="instruct2"), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", voice_id="v", prompt={"text": "t", "audio": b"x"}), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", prompt={"text": "t"}), errors.MISSING_FIELD),
    (pack(type="start", context_id="a", prompt={"text": "t", "audio": "not bin"}), errors.INVALID_FIELD),
    (pack(type="start", context_id="a", prompt="x"), errors.INVALID_FIELD),
    (pack(type="start", context_id=""), errors.INVALID_FIELD),
    (pack(type="start", context_id="x" * 129), errors.INVALID_FIELD),
    (pack(type="voice.register", voice_id="v", prompt_text="t", audio=b""), errors.INVALID_AUDIO),
    (pack(type="voice.register", voice_id="v", prompt_text="", audio=b"x"), errors.INVALID_FIELD),
    (pack(type="voice.delete", voice_id=""), errors.INVALID_FIELD),
])
def test_invalid_frames_are_refused_with_their_code(data, code):
    assert refused(data).code == code


def test_errors_name_the_context_when_known():
    assert refused(pack(type="text", context_id="ctx-9")).context_id == "ctx-9"
    assert refused(pack(type="start", context_id="ctx-9", speed=9.0)).context_id == "ctx-9"
    assert refused(pack(type="bogus", context_id="ctx-9")).context_id == "ctx-9"
    assert refused(b"\xc1").context_id is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_a_protocol_error_or_a_message(data):
    try:
        assert isinstance(codec.decode_client(data), m.Message)
    except errors.ProtocolError as exc:
        assert exc.code in errors.ALL_CODES


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200), st.text(min_size=1, max_size=128))
def test_text_round_trip_any_unicode(text, cid):
    assert codec.decode_client(codec.encode(m.Text(cid, text))) == m.Text(cid, text)


def test_protocol_md_documents_every_message_and_error_code():
    doc = (REPO / "protocol" / "PROTOCOL.md").read_text()
    assert "v1" in doc
    for t in [*m.CLIENT_MESSAGES, *m.SERVER_MESSAGES]:
        assert re.search(rf"^#+ .*`{re.escape(t)}`", doc, re.M), f"message {t} has no section"
    for code in errors.ALL_CODES:
        assert f"`{code}`" in doc, f"error code {code} undocumented"
    for c in errors.CloseCode:
        assert str(int(c)) in doc, f"close code {int(c)} undocumented"
    assert doc.count("```") >= 2 * len([*m.CLIENT_MESSAGES, *m.SERVER_MESSAGES])  # an example each


# ------------------------------------------------------------------ G.711 and PCM

def _ref_ulaw(s: int) -> int:
    """Scalar mu-law encoder written from the G.711 segment table (independent of the vectorized one)."""
    v = s >> 2                                   # 14-bit, floor as in the reference C code
    mask = 0x7F if v < 0 else 0xFF
    v = min(abs(v), 8159) + 33                   # clip, add the bias
    for seg in range(8):
        if v < (64 << seg):
            return (((seg << 4) | ((v >> (seg + 1)) & 0x0F)) ^ mask) & 0xFF
    return 0x7F ^ mask


def _ref_alaw(s: int) -> int:
    sign = 0x80 if s >= 0 else 0
    mag = s if s >= 0 else -s - 1
    mag = min(mag, 32767) >> 3
    if mag < 32:
        code = mag >> 1
    else:
        exp = mag.bit_length() - 5
        code = (exp << 4) | ((mag >> exp) & 0x0F)
    return (sign | code) ^ 0x55


def test_mulaw_and_alaw_are_exact_for_every_16_bit_value():
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    ulaw, alaw = lin2ulaw(pcm), lin2alaw(pcm)
    assert ulaw.dtype == np.uint8 and alaw.dtype == np.uint8
    step = 37  # the scalar references are slow; every 37th value plus the segment edges
    idx = np.unique(np.r_[np.arange(0, 65536, step), 0, 1, 32767, 32768, 32769, 65535])
    assert [int(ulaw[i]) for i in idx] == [_ref_ulaw(int(pcm[i])) for i in idx]
    assert [int(alaw[i]) for i in idx] == [_ref_alaw(int(pcm[i])) for i in idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop  # the CPython reference implementation (removed in 3.13)
        except ImportError:
            return
    assert ulaw.tobytes() == audioop.lin2ulaw(pcm.tobytes(), 2)
    assert alaw.tobytes() == audioop.lin2alaw(pcm.tobytes(), 2)
    codes = np.arange(256, dtype=np.uint8)
    assert ulaw2lin(codes).tobytes() == audioop.ulaw2lin(codes.tobytes(), 2)
    assert alaw2lin(codes).tobytes() == audioop.alaw2lin(codes.tobytes(), 2)


def test_g711_decode_encode_is_idempotent_and_close():
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal(lin2ulaw(ulaw2lin(codes))[codes != 0x7F], codes[codes != 0x7F])  # 0x7F/0xFF both = 0
    assert np.array_equal(lin2alaw(alaw2lin(codes)), codes)
    pcm = np.arange(-32768, 32768, 7, dtype=np.int16)
    ref = pcm.astype(int)
    for enc, dec in ((lin2ulaw, ulaw2lin), (lin2alaw, alaw2lin)):
        err = np.abs(dec(enc(pcm)).astype(int) - ref)
        assert np.all(err <= np.maximum(0.05 * np.abs(ref), 20))   # companding error: ~4 %, more near zero


def test_float_to_s16_rounds_and_clips():
    x = np.array([0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 1 / 32768, -0.6 / 32768], np.float32)
    assert float_to_s16(x).tolist() == [0, 32767, -32768, 32767, -32768, 16384, 1, -1]


@pytest.mark.parametrize("encoding", list(BYTES_PER_SAMPLE))
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100, 48000])
def test_encoder_length_and_format(encoding, rate):
    enc = AudioEncoder(encoding, rate)
    sizes = [960, 0, 1920, 333, 14400, 7]
    x = [0.5 * np.sin(2 * np.pi * 440 * np.arange(sum(sizes)) / 24000).astype(np.float32)]
    out, pos = [], 0
    for i, n in enumerate(sizes):
        out.append(enc.encode(x[0][pos:pos + n], final=i == len(sizes) - 1))
        pos += n
    data = b"".join(out)
    bps = BYTES_PER_SAMPLE[encoding]
    assert len(data) % bps == 0
    assert len(data) // bps == round(sum(sizes) * rate / 24000)
    y = decode_bytes(data, encoding)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * rate / len(y)
    assert abs(peak_hz - 440) < 5, peak_hz
    mid = y[len(y) // 4: 3 * len(y) // 4]
    assert 0.3 < np.max(np.abs(mid)) < 0.6


def test_s16_and_f32_bytes_are_little_endian():
    x = np.array([0.25, -0.5], np.float32)
    assert AudioEncoder("pcm_s16le", 24000).encode(x) == np.array([8192, -16384], "<i2").tobytes()
    assert AudioEncoder("pcm_f32le", 24000).encode(x) == x.astype("<f4").tobytes()


# ------------------------------------------------------------------ config and auth

def test_config_precedence_yaml_env_flags(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("port: 9001\nmax_voices: 7\napi_keys: [a]\n")
    cfg = load_config(y, env={"COSY_PORT": "9002", "COSY_IDLE_TIMEOUT_S": "3.5", "COSY_API_KEYS": "k1, k2"},
                      overrides={"port": 9003, "host": None})
    assert (cfg.port, cfg.max_voices, cfg.idle_timeout_s, cfg.api_keys, cfg.host) == \
        (9003, 7, 3.5, ["k1", "k2"], ServerConfig().host)
    y.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="prot"):
        load_config(y, env={})


def test_repo_config_file_loads():
    cfg = load_config(REPO / "configs" / "server.yaml", env={})
    assert cfg.model == "pretrained_models/CosyVoice2-0.5B" and cfg.api_keys == []


def test_auth_header_query_and_open_mode():
    assert auth.request_token("/v1/tts", {"Authorization": "Bearer s3cret"}) == "s3cret"
    assert auth.request_token("/v1/tts?token=abc&x=1", {}) == "abc"
    assert auth.request_token("/v1/tts?token=abc", {"Authorization": "Bearer h"}) == "h"
    assert auth.request_token("/v1/tts", {"Authorization": "Basic eA=="}) is None
    assert auth.is_authorized([], None)
    assert auth.is_authorized(["k1", "k2"], "k2")
    assert not auth.is_authorized(["k1"], "k2")
    assert not auth.is_authorized(["k1"], None)
    assert not auth.is_authorized(["k1"], "k1 ")


# ------------------------------------------------------------------ send queue

def test_outbox_bounds_stream_messages_but_not_control():
    async def scenario():
        box = Outbox(limit_bytes=10)
        await box.put_stream("a", b"x" * 8)
        await box.put_stream("a", b"y" * 8)          # admitted: the queue was below the limit
        blocked = asyncio.create_task(box.put_stream("b", b"z" * 4))
        await asyncio.sleep(0.01)
        assert not blocked.done()                     # full: waits
        box.put_control(b"c")                         # never waits
        box.drop("a")                                 # frees space
        await asyncio.wait_for(blocked, 1)
        assert [await box.get() for _ in range(2)] == [b"c", b"zzzz"]
        box.close()
        assert await box.get() is None
    asyncio.run(scenario())


def test_playback_clock_counts_late_audio_as_underruns():
    clock = PlaybackClock()
    clock.on_audio(10.0, 1.0)     # playback starts: 1 s buffered
    clock.on_audio(10.9, 0.5)     # in time (played until 11.0)
    clock.on_audio(11.6, 0.5)     # late: 1.5 s had played out by 11.5
    clock.on_audio(11.8, 2.0)     # in time (played until 12.0)
    assert (clock.underruns, clock.audio_seconds, clock.first_audio_at) == (1, 4.0, 10.0)


def test_web_demo_msgpack_codec_matches_the_python_codec():
    """web_demo/msgpack.js decodes and re-encodes server frames, and its client frames decode here."""
    import json
    import shutil
    import subprocess
    node = shutil.which("node")
    assert node, "node (Debian nodejs) is needed to test the web demo's codec"
    script = """
      const fs = require("fs");
      eval(fs.readFileSync(process.argv[1], "utf8") + "; globalThis.MsgPack = MsgPack;");
      const frames = JSON.parse(fs.readFileSync(0, "utf8"));
      const again = frames.map((h) => Buffer.from(MsgPack.encode(MsgPack.decode(Buffer.from(h, "hex")))).toString("hex"));
      const start = Buffer.from(MsgPack.encode({type: "start", context_id: "web-1", voice_id: "alice", speed: 1.5,
        sample_rate: 24000, encoding: "pcm_f32le", text_normalization: false, prompt: undefined})).toString("hex");
      const reg = Buffer.from(MsgPack.encode({type: "voice.register", voice_id: "v", prompt_text: "t",
        audio: new Uint8Array(70000).fill(7)})).toString("hex");
      process.stdout.write(JSON.stringify({again, start, reg}));
    """
    frames = [codec.encode(x) for x in SERVER_EXAMPLES]
    frames.append(codec.encode(m.Audio("c", 70000, bytes(range(256)) * 300, "pcm_f32le", 48000, -1, "é" * 40, True)))
    out = subprocess.run([node, "-e", script, str(REPO / "web_demo" / "msgpack.js")], capture_output=True, text=True,
                         input=json.dumps([f.hex() for f in frames]), timeout=60, check=True)
    res = json.loads(out.stdout)
    # equal messages (JS numbers cannot keep 3.0 apart from 3, so a float may come back as an int)
    assert [codec.decode_server(bytes.fromhex(h)) for h in res["again"]] == [codec.decode_server(f) for f in frames]
    assert bytes.fromhex(res["again"][-1]) == frames[-1]   # str, bin 32, uint32, negative int, bool
    assert codec.decode_client(bytes.fromhex(res["start"])) == m.Start(
        "web-1", voice_id="alice", speed=1.5, encoding="pcm_f32le", text_normalization=False)
    assert codec.decode_client(bytes.fromhex(res["reg"])) == m.VoiceRegister("v", "t", b"\x07" * 70000)
