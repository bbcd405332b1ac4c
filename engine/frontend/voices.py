"""The voice store: registered zero-shot voices on disk plus the read-only official ``spk2info.pt``.

On-disk format: one file ``<voice_id>.voice.pt`` per voice, a ``torch.save`` of
``{"format": FORMAT, "voice_id", "prompt_text" (str), "kind", "entry"}`` where ``entry`` is exactly an
official ``spk2info.pt`` entry (cosyvoice2.md §7.2): for zero-shot voices the 10 keys
``prompt_text [1,Lp] int32, prompt_text_len, llm_prompt_speech_token [1,P] int32,
llm_prompt_speech_token_len, flow_prompt_speech_token [1,P] int32, flow_prompt_speech_token_len,
prompt_speech_feat [1,2P,80] float32, prompt_speech_feat_len, llm_embedding [1,192], flow_embedding
[1,192]`` (lengths int32 [1]); for sft voices ``{"embedding": [1,192]}``. ``export_spk2info`` writes
the official file. Files are written to a temporary name, fsynced and renamed (atomic on POSIX).

Voice ids: 1..64 characters, Unicode letters/digits/underscore, '-' and '.', starting with a
letter/digit/underscore (so no path separators, no '..', no hidden files). Registering an existing
id fails with ``voice_exists`` unless ``overwrite=True``. Official ``spk2info.pt`` voices are
read-only (a registered voice of the same id, with overwrite, shadows them; deleting it reveals them).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from pathlib import Path

import torch

from engine.api import EngineError, VoiceInfo
from engine.frontend.prompt import PromptProcessor, VoicePrompt

log = logging.getLogger(__name__)

FORMAT = "cosyvoice-ws.voice.v1"
SUFFIX = ".voice.pt"
MAX_ID_LEN = 64
_ID_RE = re.compile(r"[^\W][\w.\-]*")
ZERO_SHOT_KEYS = ("prompt_text", "prompt_text_len", "llm_prompt_speech_token", "llm_prompt_speech_token_len",
                  "flow_prompt_speech_token", "flow_prompt_speech_token_len", "prompt_speech_feat",
                  "prompt_speech_feat_len", "llm_embedding", "flow_embedding")


def validate_voice_id(voice_id: object) -> str:
    """Return ``voice_id`` if it is a valid id, else raise EngineError("invalid_voice_id")."""
    if not isinstance(voice_id, str) or not 1 <= len(voice_id) <= MAX_ID_LEN \
            or not _ID_RE.fullmatch(voice_id) or voice_id.isspace():
        raise EngineError("invalid_voice_id",
                          f"invalid voice id {voice_id!r}: 1..{MAX_ID_LEN} letters, digits, '_', '-', '.', "
                          "not starting with '.' or '-'")
    return voice_id


def _len(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32)


def to_spk2info_entry(vp: VoicePrompt) -> dict[str, torch.Tensor]:
    """The official ``spk2info.pt`` entry of a voice (10 keys, or ``{"embedding"}`` for sft)."""
    emb = vp.embedding.detach().to(torch.float32).reshape(1, -1).clone()
    if vp.kind == "sft":
        return {"embedding": emb}
    ids = torch.tensor([vp.prompt_text_ids], dtype=torch.int32).reshape(1, -1)
    tok = vp.speech_tokens.detach().to(torch.int32).reshape(1, -1).clone()
    feat = vp.speech_feat.detach().to(torch.float32).reshape(1, -1, 80).clone()
    return {"prompt_text": ids, "prompt_text_len": _len(ids.shape[1]),
            "llm_prompt_speech_token": tok, "llm_prompt_speech_token_len": _len(tok.shape[1]),
            "flow_prompt_speech_token": tok.clone(), "flow_prompt_speech_token_len": _len(tok.shape[1]),
            "prompt_speech_feat": feat, "prompt_speech_feat_len": _len(feat.shape[1]),
            "llm_embedding": emb, "flow_embedding": emb.clone()}


def from_spk2info_entry(entry: dict, prompt_text: str = "") -> VoicePrompt:
    """A ``VoicePrompt`` from an official entry (zero-shot keys, or sft ``{"embedding"}`` only).

    Tokens become int64 [P], features float32 [2P, 80], the embedding float32 [192]."""
    if "flow_prompt_speech_token" not in entry and "llm_prompt_speech_token" not in entry:
        emb = entry.get("embedding", entry.get("flow_embedding", entry.get("llm_embedding")))
        if emb is None:
            raise ValueError("spk2info entry has no embedding")
        return VoicePrompt(prompt_text="", prompt_text_ids=[], speech_tokens=torch.zeros(0, dtype=torch.int64),
                           speech_feat=torch.zeros(0, 80), embedding=emb.detach().float().reshape(-1).clone(),
                           kind="sft")
    tok = entry.get("flow_prompt_speech_token", entry.get("llm_prompt_speech_token"))
    ids = entry.get("prompt_text")
    emb = entry.get("flow_embedding", entry.get("llm_embedding", entry.get("embedding")))
    return VoicePrompt(
        prompt_text=prompt_text,
        prompt_text_ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        speech_tokens=tok.detach().to(torch.int64).reshape(-1).clone(),
        speech_feat=entry["prompt_speech_feat"].detach().float().reshape(-1, 80).clone(),
        embedding=emb.detach().float().reshape(-1).clone())


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class VoiceStore:
    """Registered voices in ``directory`` plus the official voices of ``spk2info_path`` (if given).

    ``processor`` turns (prompt text, audio) into a ``VoicePrompt`` for ``register``; ``tokenizer``
    (optional, ``decode(ids)``) recovers prompt texts of official entries for display.
    All methods are thread-safe; a failed call changes nothing."""

    def __init__(self, directory: str | Path, spk2info_path: str | Path | None = None,
                 processor: PromptProcessor | None = None, tokenizer=None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.processor = processor
        self._lock = threading.RLock()
        self._official: dict[str, VoicePrompt] = {}
        self._voices: dict[str, VoicePrompt] = {}
        if spk2info_path is not None and Path(spk2info_path).exists():
            self._official = load_spk2info(spk2info_path, tokenizer)
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                vid, vp = self._read(path)
            except Exception as exc:  # a damaged file must not take the whole store down
                log.warning("skipping unreadable voice file %s: %s", path, exc)
                continue
            self._voices[vid] = vp
        for stale in self.directory.glob(f".*{SUFFIX}.*.tmp"):
            stale.unlink(missing_ok=True)

    # -- queries ----------------------------------------------------------------------------------

    def get(self, voice_id: str) -> VoicePrompt:
        """The voice's prompt; raises EngineError("voice_not_found")."""
        with self._lock:
            vp = self._voices.get(voice_id) or self._official.get(voice_id)
        if vp is None:
            raise EngineError("voice_not_found", f"no voice {voice_id!r}")
        return vp

    def __contains__(self, voice_id: str) -> bool:
        with self._lock:
            return voice_id in self._voices or voice_id in self._official

    def list(self) -> list[VoiceInfo]:
        """All voices (registered ones shadow official ones of the same id), sorted by id."""
        with self._lock:
            merged = {**self._official, **self._voices}
        return [_info(vid, vp) for vid, vp in sorted(merged.items())]

    def info(self, voice_id: str) -> VoiceInfo:
        return _info(voice_id, self.get(voice_id))

    # -- mutations --------------------------------------------------------------------------------

    def register(self, voice_id: str, prompt_text: str | bytes, audio: bytes, overwrite: bool = False) -> VoiceInfo:
        """Process (prompt text, audio bytes) and store it under ``voice_id``.

        Raises EngineError: ``invalid_voice_id``, ``voice_exists`` (id taken, ``overwrite`` False) and
        every prompt error of ``PromptProcessor.process`` (``invalid_audio``, ``audio_too_short``, ...)."""
        validate_voice_id(voice_id)
        self._check_free(voice_id, overwrite)
        if self.processor is None:
            raise EngineError("voice_registration_unavailable", "this voice store has no prompt processor")
        return self.register_prompt(voice_id, self.processor.process(prompt_text, audio), overwrite)

    def register_prompt(self, voice_id: str, prompt: VoicePrompt, overwrite: bool = False) -> VoiceInfo:
        """Store an already processed prompt under ``voice_id`` (same rules as ``register``)."""
        validate_voice_id(voice_id)
        record = {"format": FORMAT, "voice_id": voice_id, "prompt_text": prompt.prompt_text,
                  "kind": prompt.kind, "entry": to_spk2info_entry(prompt)}
        with self._lock:
            self._check_free(voice_id, overwrite)
            _atomic_save(record, self._path(voice_id))
            self._voices[voice_id] = _record_prompt(record)
            return _info(voice_id, self._voices[voice_id])

    def delete(self, voice_id: str) -> None:
        """Remove a registered voice; EngineError ``voice_not_found`` or ``voice_read_only``."""
        with self._lock:
            if voice_id not in self._voices:
                if voice_id in self._official:
                    raise EngineError("voice_read_only", f"voice {voice_id!r} comes from spk2info.pt")
                raise EngineError("voice_not_found", f"no voice {voice_id!r}")
            self._path(voice_id).unlink(missing_ok=True)
            del self._voices[voice_id]

    def export_spk2info(self, path: str | Path) -> Path:
        """Write every voice (official and registered) as an official ``spk2info.pt``."""
        with self._lock:
            merged = {**self._official, **self._voices}
            data = {vid: to_spk2info_entry(vp) for vid, vp in merged.items()}
            _atomic_save(data, Path(path))
        return Path(path)

    # -- internals --------------------------------------------------------------------------------

    def _check_free(self, voice_id: str, overwrite: bool) -> None:
        with self._lock:
            if not overwrite and (voice_id in self._voices or voice_id in self._official):
                raise EngineError("voice_exists", f"voice {voice_id!r} exists; pass overwrite=True to replace it")

    def _path(self, voice_id: str) -> Path:
        return self.directory / f"{voice_id}{SUFFIX}"

    def _read(self, path: Path) -> tuple[str, VoicePrompt]:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        vid = validate_voice_id(record["voice_id"])
        if path.name != f"{vid}{SUFFIX}":
            raise ValueError(f"file name does not match voice id {vid!r}")
        return vid, _record_prompt(record)


def _record_prompt(record: dict) -> VoicePrompt:
    vp = from_spk2info_entry(record["entry"], record.get("prompt_text", ""))
    vp.kind = record.get("kind", vp.kind)
    return vp


def _info(voice_id: str, vp: VoicePrompt) -> VoiceInfo:
    return VoiceInfo(voice_id=voice_id, prompt_text=vp.prompt_text, prompt_seconds=vp.prompt_seconds,
                     kind="sft" if vp.kind == "sft" else "zero_shot")


def load_spk2info(path: str | Path, tokenizer=None) -> dict[str, VoicePrompt]:
    """Read an official ``spk2info.pt`` ({id: entry}); prompt texts are decoded with ``tokenizer``
    when given (the file stores only ids)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a spk2info dict")
    out = {}
    for vid, entry in data.items():
        vp = from_spk2info_entry(entry)
        if tokenizer is not None and vp.prompt_text_ids:
            vp.prompt_text = tokenizer.decode(vp.prompt_text_ids)
        out[str(vid)] = vp
    return out
