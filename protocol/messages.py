"""Protocol v1 messages as dataclasses (see protocol/PROTOCOL.md, the normative description).

Each class's ``TYPE`` is the value of the ``type`` key on the wire; field names are the wire keys.
``check()`` enforces value ranges after the codec has checked field types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from protocol import errors

VERSION = "v1"
ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
MODES = ("zero_shot", "cross_lingual", "instruct2", "sft")
INPUT_MODES = ("segments", "bistream")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
MIN_SPEED, MAX_SPEED = 0.5, 2.0
MIN_FIRST_CHUNK, MAX_FIRST_CHUNK = 5, 100
MAX_ID_LEN = 128


def _bad(msg: str, context_id: str | None = None) -> errors.ProtocolError:
    return errors.ProtocolError(errors.INVALID_FIELD, msg, context_id)


def _check_id(name: str, value: str, context_id: str | None = None) -> None:
    if not value or len(value) > MAX_ID_LEN:
        raise _bad(f"{name} must be 1..{MAX_ID_LEN} characters", context_id)


class Message:
    TYPE: ClassVar[str] = ""

    def check(self) -> None:
        """Raise ProtocolError if a value is out of range (types are already checked)."""


# ---------------------------------------------------------------- client -> server

@dataclass
class Prompt:
    """An inline voice prompt: the transcript of ``audio`` and the audio file bytes (wav/flac/ogg)."""
    text: str
    audio: bytes


@dataclass
class Start(Message):
    TYPE: ClassVar[str] = "start"
    context_id: str
    voice_id: str | None = None
    prompt: Prompt | None = None
    mode: str = "zero_shot"
    instruct_text: str = ""
    encoding: str = "pcm_s16le"
    sample_rate: int = 24000
    speed: float = 1.0
    input_mode: str = "segments"
    text_normalization: bool = True
    first_chunk_tokens: int = 15
    text: str = ""            # optional first text, same as a following ``text`` message

    def check(self) -> None:
        c = self.context_id
        _check_id("context_id", c)
        if self.voice_id is not None and self.prompt is not None:
            raise _bad("give voice_id or prompt, not both", c)
        if self.voice_id is not None:
            _check_id("voice_id", self.voice_id, c)
        if self.encoding not in ENCODINGS:
            raise _bad(f"encoding must be one of {', '.join(ENCODINGS)}", c)
        if self.mode not in MODES:
            raise _bad(f"mode must be one of {', '.join(MODES)}", c)
        if self.input_mode not in INPUT_MODES:
            raise _bad(f"input_mode must be one of {', '.join(INPUT_MODES)}", c)
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise _bad(f"sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]", c)
        if not MIN_SPEED <= self.speed <= MAX_SPEED:
            raise _bad(f"speed must be in [{MIN_SPEED}, {MAX_SPEED}]", c)
        if not MIN_FIRST_CHUNK <= self.first_chunk_tokens <= MAX_FIRST_CHUNK:
            raise _bad(f"first_chunk_tokens must be in [{MIN_FIRST_CHUNK}, {MAX_FIRST_CHUNK}]", c)
        if self.mode == "instruct2" and not self.instruct_text:
            raise _bad("mode instruct2 needs instruct_text", c)


@dataclass
class Text(Message):
    TYPE: ClassVar[str] = "text"
    context_id: str
    text: str


@dataclass
class Flush(Message):
    TYPE: ClassVar[str] = "flush"
    context_id: str


@dataclass
class End(Message):
    TYPE: ClassVar[str] = "end"
    context_id: str


@dataclass
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    context_id: str


@dataclass
class VoiceRegister(Message):
    TYPE: ClassVar[str] = "voice.register"
    voice_id: str
    prompt_text: str
    audio: bytes
    overwrite: bool = False

    def check(self) -> None:
        _check_id("voice_id", self.voice_id)
        if not self.prompt_text:
            raise _bad("prompt_text must not be empty")
        if not self.audio:
            raise errors.ProtocolError(errors.INVALID_AUDIO, "audio is empty")


@dataclass
class VoiceList(Message):
    TYPE: ClassVar[str] = "voice.list"


@dataclass
class VoiceDelete(Message):
    TYPE: ClassVar[str] = "voice.delete"
    voice_id: str

    def check(self) -> None:
        _check_id("voice_id", self.voice_id)


CLIENT_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Start, Text, Flush, End, Cancel, VoiceRegister, VoiceList, VoiceDelete)}

# ---------------------------------------------------------------- server -> client


@dataclass
class Started(Message):
    TYPE: ClassVar[str] = "started"
    context_id: str
    encoding: str
    sample_rate: int


@dataclass
class Segment(Message):
    TYPE: ClassVar[str] = "segment"
    context_id: str
    index: int
    text: str


@dataclass
class Audio(Message):
    TYPE: ClassVar[str] = "audio"
    context_id: str
    seq: int
    audio: bytes              # raw samples in ``encoding`` at ``sample_rate``, mono
    encoding: str
    sample_rate: int
    segment_index: int
    text: str                 # the text of the segment this audio voices
    final: bool


@dataclass
class Done(Message):
    TYPE: ClassVar[str] = "done"
    context_id: str
    time_to_first_audio_s: float | None   # first text received -> first audio message queued
    audio_seconds: float
    wall_seconds: float                   # ``start`` received -> ``done`` queued
    real_time_factor: float | None        # engine wall seconds / audio seconds
    underruns: int                        # times the audio sent fell behind real-time playback


@dataclass
class Cancelled(Message):
    TYPE: ClassVar[str] = "cancelled"
    context_id: str


@dataclass
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    context_id: str | None = None


@dataclass
class Voice:
    voice_id: str
    prompt_text: str
    prompt_seconds: float
    kind: str = "zero_shot"


@dataclass
class VoiceRegistered(Message):
    TYPE: ClassVar[str] = "voice.registered"
    voice: Voice


@dataclass
class Voices(Message):
    TYPE: ClassVar[str] = "voices"
    voices: list[Voice] = field(default_factory=list)


@dataclass
class VoiceDeleted(Message):
    TYPE: ClassVar[str] = "voice.deleted"
    voice_id: str


SERVER_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Started, Segment, Audio, Done, Cancelled, Error, VoiceRegistered, Voices,
                        VoiceDeleted)}
