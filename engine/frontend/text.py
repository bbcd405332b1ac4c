"""Text normalization and sentence splitting, equal to the reference frontend with wetext 0.1.8.

``TextFrontend.normalize(text, split)`` reproduces upstream ``CosyVoiceFrontEnd.text_normalize``
(cosyvoice2.md §1.4, golden README §9, §13.6-7):

* text holding both ``<|`` and ``|>`` (markup such as ``<|endofprompt|>``) is returned unchanged;
* Chinese path (any char in U+4E00..U+9FFF): wetext TN, then the zh post-rules (``zh_post_rules``),
  then ``split_paragraph`` with lengths in characters;
* English path: wetext TN, every digit run spelled out in English words, then ``split_paragraph`` with
  lengths in Qwen tokens;
* pieces made only of punctuation/symbols are dropped from the split result.

``split=False`` returns the normalized string (no final stop appended); ``split=True`` the list of
synthesis segments.
"""
from __future__ import annotations

import re
import threading
import unicodedata
from typing import Callable

from engine.frontend.number_words import number_to_words

ZH_STOPS = frozenset("。？！；：、.?!;")
EN_STOPS = frozenset(".?!;:")
CLOSING_QUOTES = ('"', "”")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")


def contains_chinese(text: str) -> bool:
    """True if any character is a CJK unified ideograph (U+4E00..U+9FFF): the zh path is taken."""
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def is_markup(text: str) -> bool:
    """True if normalization is skipped for ``text`` (it holds both ``<|`` and ``|>``)."""
    return "<|" in text and "|>" in text


def is_only_punctuation(text: str) -> bool:
    """True if every character is Unicode punctuation (P*) or a symbol (S*); also for ''."""
    return all(unicodedata.category(c)[0] in "PS" for c in text)


def spell_out_number(text: str) -> str:
    """Replace every maximal run of ``str.isdigit()`` characters by its English cardinal words."""
    out, run = [], []
    for c in text:
        if c.isdigit():
            run.append(c)
            continue
        if run:
            out.append(number_to_words("".join(run)))
            run = []
        out.append(c)
    if run:
        out.append(number_to_words("".join(run)))
    return "".join(out)


def replace_blank(text: str) -> str:
    """Drop every space except one between two non-space ASCII characters (zh path)."""
    out = []
    for i, c in enumerate(text):
        if c != " ":
            out.append(c)
            continue
        # i - 1 wraps to the last character at i == 0, as the reference does.
        nxt = text[i + 1] if i + 1 < len(text) else " "
        prev = text[i - 1]
        if nxt.isascii() and nxt != " " and prev.isascii() and prev != " ":
            out.append(c)
    return "".join(out)


def zh_post_rules(text: str) -> str:
    """The Chinese path's rules applied after wetext (order matters)."""
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = text.replace(".", "。")
    text = text.replace(" - ", "，")
    for ch in "（）【】`":
        text = text.replace(ch, "")
    text = text.replace("——", " ")
    return _TRAILING_COMMAS.sub("。", text)


def split_paragraph(text: str, length: Callable[[str], int], lang: str, token_max_n: int = 80,
                    token_min_n: int = 60, merge_len: int = 20, comma_split: bool = False) -> list[str]:
    """Cut ``text`` into sentences and greedily merge them into synthesis-sized pieces.

    ``length`` measures a piece (characters for zh, Qwen tokens for en). A final stop (``。``/``.``)
    is appended when missing; a sentence ends at each stop mark (a closing quote right after it stays
    with it); a stop mark right after another one is dropped. Sentences are merged while the merged
    length is <= ``token_max_n`` or the current piece is <= ``token_min_n``; a final remainder shorter
    than ``merge_len`` joins the previous piece."""
    if not text:
        return []
    stops = set(ZH_STOPS if lang == "zh" else EN_STOPS)
    if comma_split:
        stops |= {"，", ","}
    if text[-1] not in stops:
        text += "。" if lang == "zh" else "."

    sentences: list[str] = []
    start = 0
    for i, c in enumerate(text):
        if c not in stops:
            continue
        if i > start:
            sentences.append(text[start:i] + c)
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES and sentences:
            sentences[-1] += text[i + 1]
            start = i + 2
        else:
            start = i + 1

    pieces: list[str] = []
    cur = ""
    for s in sentences:
        if length(cur + s) > token_max_n and length(cur) > token_min_n:
            pieces.append(cur)
            cur = ""
        cur += s
    if cur:
        if pieces and length(cur) < merge_len:
            pieces[-1] += cur
        else:
            pieces.append(cur)
    return pieces


class TextFrontend:
    """The reference text normalizer (wetext 0.1.8 + CosyVoice's rules) for one tokenizer.

    ``tokenizer`` needs ``encode(str) -> list[int]`` (English split lengths are token counts).
    ``use_wetext=False`` skips the wetext pass (the post-rules and splitting still run: upstream's
    behaviour without a TN package). ``enabled=False`` is upstream's ``text_frontend=False``: text is
    returned unchanged (``[text]`` when split). Stateless between calls; safe to share between streams."""

    def __init__(self, tokenizer, use_wetext: bool = True, enabled: bool = True):
        self.tokenizer = tokenizer
        self.enabled = enabled
        self._lock = threading.Lock()
        self._wetext = None
        if use_wetext:
            from wetext import Normalizer
            # The reference builds zh with remove_erhua=False and en with defaults: the same config.
            self._wetext = Normalizer(remove_erhua=False) if enabled else None

    def wetext(self, text: str) -> str:
        """The bare wetext TN output (lang auto), or ``text`` when wetext is disabled."""
        if self._wetext is None:
            return text
        # wetext shares its FSTs process-wide; OpenFst does not promise thread-safe reads.
        with self._lock:
            return self._wetext.normalize(text)

    def normalize(self, text: str, split: bool = True) -> list[str] | str:
        """Normalize ``text``; a list of synthesis segments if ``split`` else one string.

        Empty (or whitespace-only) text gives ``[]`` / ``""`` (the reference would fail on it)."""
        if not self.enabled or is_markup(text):
            return [text] if split else text
        text = text.strip()
        if not text:
            return [] if split else ""
        if contains_chinese(text):
            text = zh_post_rules(self.wetext(text))
            lang, length = "zh", len
        else:
            text = spell_out_number(self.wetext(text))
            lang, length = "en", lambda s: len(self.tokenizer.encode(s))
        if not split:
            return text
        return [p for p in split_paragraph(text, length, lang) if not is_only_punctuation(p)]

    def segment_token_ids(self, segments: list[str]) -> list[list[int]]:
        """Token ids of each segment (no BOS/EOS)."""
        return [self.tokenizer.encode(s) for s in segments]


_ALLOWED_CONTROLS = frozenset("\t\n\r")


def validate_text(text: str | bytes, max_chars: int, what: str = "text") -> str:
    """Check user text before it reaches the frontend; returns it as ``str`` (bytes are UTF-8 decoded).

    Raises EngineError with code ``invalid_text`` (not valid UTF-8, lone surrogates, control
    characters other than tab/newline/carriage return, or not a string), ``empty_text`` (empty or
    whitespace only) or ``text_too_long`` (more than ``max_chars`` characters)."""
    from engine.api import EngineError

    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EngineError("invalid_text", f"{what} is not valid UTF-8: {exc}") from None
    if not isinstance(text, str):
        raise EngineError("invalid_text", f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EngineError("invalid_text", f"{what} contains unpaired surrogates") from None
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in _ALLOWED_CONTROLS), None)
    if bad is not None:
        raise EngineError("invalid_text", f"{what} contains the control character U+{ord(bad):04X}")
    if not text.strip():
        raise EngineError("empty_text", f"{what} is empty")
    if len(text) > max_chars:
        raise EngineError("text_too_long", f"{what} has {len(text)} characters; the maximum is {max_chars}")
    return text
