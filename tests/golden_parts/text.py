"""Golden part ``text``: normalization, splitting and token ids equal the reference (README §9)."""
from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path

from engine.frontend.text import TextFrontend, contains_chinese, is_markup
from engine.frontend.tokenizer import CosyVoice2Tokenizer, write_tokenizer_files


@functools.lru_cache(maxsize=1)
def _frontend() -> tuple[TextFrontend, Path]:
    tok_dir = Path(tempfile.mkdtemp(prefix="cosy-tok-")) / "CosyVoice-BlankEN"
    write_tokenizer_files(tok_dir)
    return TextFrontend(CosyVoice2Tokenizer(tok_dir)), tok_dir


@functools.lru_cache(maxsize=8)
def _load(set_dir: Path) -> dict:
    return json.loads((set_dir / "cases" / "text.json").read_text())


def case_ids(set_dir: Path) -> list[str]:
    data = _load(Path(set_dir))
    return ["tokenizer"] + [f"case{i:02d}" for i in range(len(data["cases"]))]


def check(set_dir: Path, case_id: str) -> None:
    data = _load(Path(set_dir))
    fe, tok_dir = _frontend()
    if case_id == "tokenizer":
        for name, sha in data["tokenizer_files_sha256"].items():
            got = hashlib.sha256((tok_dir / name).read_bytes()).hexdigest()
            assert got == sha, f"{name}: sha256 {got} != {sha}"
        assert len(fe.tokenizer) == data["tokenizer_len"]
        for token, tid in data["special_token_ids"].items():
            assert fe.tokenizer.encode(token) == [tid], token
        assert fe.tokenizer.endofprompt_id == data["special_token_ids"]["<|endofprompt|>"]
        return
    case = data["cases"][int(case_id[4:])]
    text = case["input"]
    assert ("zh" if contains_chinese(text) else "en") == case["lang"]
    assert is_markup(text) == case["frontend_skipped"]
    if case["wetext_output"] is not None:
        assert fe.wetext(text.strip()) == case["wetext_output"]
    assert fe.normalize(text, split=False) == case["normalized"]
    segments = fe.normalize(text, split=True)
    assert segments == case["segments"]
    ids = fe.segment_token_ids(segments)
    assert ids == case["segment_token_ids"]
    assert [len(i) for i in ids] == case["segment_token_counts"]
