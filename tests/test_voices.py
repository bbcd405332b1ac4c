"""Prompt processing and the voice store: round trips, official spk2info layout, and every bad input
(clear EngineError code, store unchanged)."""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from engine.api import EngineError
from engine.frontend import features as F
from engine.frontend.prompt import PromptLimits, PromptProcessor, VoicePrompt
from engine.frontend.tokenizer import write_tokenizer_files
from engine.frontend.voices import (ZERO_SHOT_KEYS, VoiceStore, from_spk2info_entry, load_spk2info,
                                    to_spk2info_entry, validate_voice_id)
from engine.tools.onnx_standins import write_campplus, write_speech_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("frontend-model")
    write_tokenizer_files(d / "CosyVoice-BlankEN")
    write_campplus(d / "campplus.onnx", seed=0)
    write_speech_tokenizer(d / "speech_tokenizer_v2.onnx", seed=0)
    return d


@pytest.fixture(scope="module")
def processor(model_dir) -> PromptProcessor:
    return PromptProcessor(model_dir, "cpu", limits=PromptLimits(max_text_chars=200))


def speech_like(sr: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal with a little noise (float32)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(sr * seconds))) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    x = 0.3 * x / np.abs(x).max() + 0.01 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def snapshot(store: VoiceStore) -> tuple:
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in store.directory.iterdir())
    return [(v.voice_id, v.prompt_text, v.prompt_seconds) for v in store.list()], files


# -- prompt processing --------------------------------------------------------------------------

def test_process_shapes_and_alignment(processor):
    audio = wav_bytes(speech_like(24000, 3.0), 24000)
    vp = processor.process("希望你以后能够做的比我还好呦。", audio)
    p = vp.speech_tokens.numel()
    assert vp.speech_tokens.dtype == torch.int64 and vp.speech_tokens.shape == (p,)
    assert vp.speech_feat.shape == (2 * p, 80) and vp.speech_feat.dtype == torch.float32
    assert vp.embedding.shape == (192,) and vp.embedding.dtype == torch.float32
    assert 0 <= int(vp.speech_tokens.min()) and int(vp.speech_tokens.max()) <= 6560
    # §1.9: P = min(mel frames // 2, #tokens); 3 s -> 150 frames, 75 tokens
    assert p == 75 and vp.prompt_seconds == pytest.approx(3.0)
    assert vp.prompt_text_ids == processor.text_frontend.tokenizer.encode(
        processor.text_frontend.normalize("希望你以后能够做的比我还好呦。", split=False))
    # the pieces are the documented functions of the resampled audio
    wav, sr = F.decode_audio(audio)
    w16, w24 = F.resample(wav, sr, 16000), F.resample(wav, sr, 24000)
    assert torch.equal(vp.speech_feat, torch.from_numpy(F.flow_prompt_mel(w24)[: 2 * p]))
    np.testing.assert_array_equal(vp.speech_tokens.numpy(), processor.speech_tokens(w16)[:p])
    np.testing.assert_array_equal(vp.embedding.numpy(), processor.embedding(w16))


def test_process_any_rate_and_stereo(processor):
    x = speech_like(44100, 2.0, channels=2)
    vp = processor.process("Hello there.", wav_bytes(x, 44100, "FLAC", "PCM_24"))
    mono = processor.process("Hello there.", wav_bytes(x.mean(axis=1), 44100, "FLAC", "PCM_24"))
    assert vp.speech_tokens.numel() == 50
    assert torch.allclose(vp.speech_feat, mono.speech_feat, atol=1e-3)
    assert vp.prompt_text_ids == mono.prompt_text_ids


# -- the store ----------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path, processor) -> VoiceStore:
    return VoiceStore(tmp_path / "voices", processor=processor)


def test_register_round_trip(store, processor, tmp_path):
    audio = wav_bytes(speech_like(16000, 2.5, seed=1), 16000)
    info = store.register("alice", "今天天气不错。", audio)
    assert info.voice_id == "alice" and info.kind == "zero_shot"
    assert info.prompt_seconds == pytest.approx((125 // 2) / 25)     # 2.5 s: 125 mel frames -> 62 tokens
    again = VoiceStore(store.directory, processor=processor)            # a restart
    assert [v.voice_id for v in again.list()] == ["alice"]
    assert again.get("alice").equals(store.get("alice"))
    assert again.get("alice").prompt_text == "今天天气不错。"
    assert not list(store.directory.glob(".*"))                        # no temp files left


def test_official_spk2info_layout_round_trip(store, tmp_path):
    store.register("bob", "Hello world.", wav_bytes(speech_like(24000, 1.5), 24000))
    out = store.export_spk2info(tmp_path / "spk2info.pt")
    data = torch.load(out, map_location="cpu", weights_only=True)
    entry = data["bob"]
    assert tuple(entry) == ZERO_SHOT_KEYS
    p = entry["llm_prompt_speech_token"].shape[1]
    assert entry["prompt_text"].dtype == torch.int32 and entry["prompt_text"].shape[0] == 1
    assert entry["flow_prompt_speech_token"].dtype == torch.int32
    assert entry["prompt_speech_feat"].shape == (1, 2 * p, 80)
    assert entry["llm_embedding"].shape == (1, 192) and torch.equal(entry["llm_embedding"], entry["flow_embedding"])
    for k in ("prompt_text_len", "llm_prompt_speech_token_len", "flow_prompt_speech_token_len",
              "prompt_speech_feat_len"):
        assert entry[k].dtype == torch.int32 and entry[k].shape == (1,)
    assert int(entry["prompt_speech_feat_len"]) == 2 * p
    # the official file loads back to the same voice, and re-exports bit-identically
    official = VoiceStore(tmp_path / "other", spk2info_path=out)
    vp = official.get("bob")
    assert vp.prompt_text_ids == store.get("bob").prompt_text_ids
    assert torch.equal(vp.speech_feat, store.get("bob").speech_feat)
    re_entry = to_spk2info_entry(vp)
    assert all(torch.equal(re_entry[k], entry[k]) and re_entry[k].dtype == entry[k].dtype for k in ZERO_SHOT_KEYS)


def test_official_sft_entries_and_read_only(tmp_path):
    emb = torch.randn(1, 192)
    torch.save({"中文女": {"embedding": emb}}, tmp_path / "spk2info.pt")
    store = VoiceStore(tmp_path / "v", spk2info_path=tmp_path / "spk2info.pt")
    vp = store.get("中文女")
    assert vp.kind == "sft" and vp.speech_tokens.numel() == 0 and vp.speech_feat.shape == (0, 80)
    assert torch.equal(vp.embedding, emb.reshape(-1))
    assert [(v.voice_id, v.kind) for v in store.list()] == [("中文女", "sft")]
    assert to_spk2info_entry(vp).keys() == {"embedding"}
    before = snapshot(store)
    with pytest.raises(EngineError) as e:
        store.delete("中文女")
    assert e.value.code == "voice_read_only" and snapshot(store) == before
    with pytest.raises(EngineError) as e:
        store.register_prompt("中文女", vp)
    assert e.value.code == "voice_exists" and snapshot(store) == before
    store.register_prompt("中文女", from_spk2info_entry({"embedding": 2 * emb}), overwrite=True)
    assert torch.equal(store.get("中文女").embedding, 2 * emb.reshape(-1))
    store.delete("中文女")                                               # reveals the official one
    assert torch.equal(store.get("中文女").embedding, emb.reshape(-1))


def test_overwrite_is_explicit_and_delete(store):
    a1 = wav_bytes(speech_like(16000, 1.2, seed=2), 16000)
    a2 = wav_bytes(speech_like(16000, 2.0, seed=3), 16000)
    store.register("carol", "First take.", a1)
    before = snapshot(store)
    first = store.get("carol")
    with pytest.raises(EngineError) as e:
        store.register("carol", "Second take.", a2)
    assert e.value.code == "voice_exists" and snapshot(store) == before and store.get("carol") is first
    store.register("carol", "Second take.", a2, overwrite=True)
    assert store.get("carol").prompt_text == "Second take." and store.get("carol").prompt_seconds == pytest.approx(2.0)
    store.delete("carol")
    assert store.list() == [] and list(store.directory.iterdir()) == []
    with pytest.raises(EngineError) as e:
        store.delete("carol")
    assert e.value.code == "voice_not_found"
    with pytest.raises(EngineError) as e:
        store.get("carol")
    assert e.value.code == "voice_not_found"


GOOD = wav_bytes(speech_like(16000, 2.0), 16000)


@pytest.mark.parametrize("voice_id,text,audio,code", [
    ("v", "Hello.", b"this is not audio", "invalid_audio"),
    ("v", "Hello.", b"", "invalid_audio"),
    ("v", "Hello.", wav_bytes(np.zeros(0, np.float32), 16000), "invalid_audio"),
    ("v", "Hello.", wav_bytes(np.zeros(32000, np.float32), 16000), "silent_audio"),
    ("v", "Hello.", wav_bytes(1e-5 * speech_like(16000, 2.0), 16000, subtype="FLOAT"), "silent_audio"),
    ("v", "Hello.", wav_bytes(speech_like(16000, 0.9), 16000), "audio_too_short"),
    ("v", "Hello.", wav_bytes(speech_like(16000, 30.5), 16000), "audio_too_long"),
    ("v", "Hello.", wav_bytes(speech_like(8000, 2.0), 8000), "sample_rate_too_low"),
    ("v", "", GOOD, "empty_text"),
    ("v", "   \n ", GOOD, "empty_text"),
    ("v", "x" * 201, GOOD, "text_too_long"),
    ("v", b"\xc3\x28 bad utf-8", GOOD, "invalid_text"),
    ("v", "bell \x07 char", GOOD, "invalid_text"),
    ("../escape", "Hello.", GOOD, "invalid_voice_id"),
    ("a/b", "Hello.", GOOD, "invalid_voice_id"),
    ("a\\b", "Hello.", GOOD, "invalid_voice_id"),
    (".hidden", "Hello.", GOOD, "invalid_voice_id"),
    ("..", "Hello.", GOOD, "invalid_voice_id"),
    ("", "Hello.", GOOD, "invalid_voice_id"),
    ("x" * 65, "Hello.", GOOD, "invalid_voice_id"),
    ("nul\x00id", "Hello.", GOOD, "invalid_voice_id"),
    ("new\nline", "Hello.", GOOD, "invalid_voice_id"),
    ("exists", "Hello.", GOOD, "voice_exists"),
])
def test_bad_input_changes_nothing(store, voice_id, text, audio, code):
    store.register("exists", "Already here.", GOOD)
    before = snapshot(store)
    with pytest.raises(EngineError) as e:
        store.register(voice_id, text, audio)
    assert e.value.code == code, e.value.message
    assert e.value.message
    assert snapshot(store) == before
    assert snapshot(VoiceStore(store.directory)) == before                 # on disk too


def test_voice_id_rules():
    for ok in ["alice", "voice_01", "v-2.final", "中文女", "A" * 64, "_x"]:
        assert validate_voice_id(ok) == ok


def test_inline_prompt_errors_match(processor):
    with pytest.raises(EngineError) as e:
        processor.process("Hi.", wav_bytes(speech_like(16000, 0.5), 16000))
    assert e.value.code == "audio_too_short"


def test_damaged_file_is_skipped(store, processor):
    store.register("good", "Fine.", GOOD)
    (store.directory / "broken.voice.pt").write_bytes(b"garbage")
    (store.directory / ".good.voice.pt.abc.tmp").write_bytes(b"stale temp")
    again = VoiceStore(store.directory, processor=processor)
    assert [v.voice_id for v in again.list()] == ["good"]
    assert not (store.directory / ".good.voice.pt.abc.tmp").exists()


def test_concurrent_registration(store, processor):
    prompt = processor.process("Threads.", GOOD)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            store.register_prompt(f"t{i}", prompt)
            store.register_prompt("shared", prompt, overwrite=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(v.voice_id for v in VoiceStore(store.directory).list()) == \
        sorted([f"t{i}" for i in range(8)] + ["shared"])
    assert isinstance(store.get("shared"), VoicePrompt)


def test_load_spk2info_decodes_prompt_text(store, processor, tmp_path):
    store.register("dora", "Good morning.", GOOD)
    path = store.export_spk2info(tmp_path / "s.pt")
    voices = load_spk2info(path, processor.text_frontend.tokenizer)
    assert voices["dora"].prompt_text == processor.text_frontend.normalize("Good morning.", split=False)
