"""Streaming clean-up of chatbot text (markdown, emoji, code) before segmentation and normalization.

The rule (applied identically to a whole text, ``clean_text``, and to any fragmentation of it,
``MarkdownCleaner``; the streaming form only waits for the few characters a decision needs):

* Fenced code blocks (a line starting with 3+ backticks or tildes, up to the closing fence) are
  skipped entirely. Inline backticks are removed, their content kept.
* At a line start (after indentation): heading marks ``#``..``######`` + space, blockquote ``>``,
  bullets ``-``/``*``/``+`` + space and ordered-list marks ``12.``/``12)`` + space are removed;
  horizontal rules (3+ of the same ``-``/``*``/``_``) and table separator rows (``|---|:--:|``) are
  dropped. In a table row (line starting with ``|``) inner pipes become ", " and outer pipes vanish.
* Inline: ``*`` runs are removed; ``~~`` (2+) removed, a single ``~`` kept; ``_`` runs are removed unless
  they join two letters/digits (``snake_case``); ``[text](url)`` -> ``text``; ``![alt](url)`` -> nothing;
  ``\\x`` (a backslash before markdown punctuation) -> ``x``. Other brackets (``[laughter]``) stay.
* Emoji (pictographs, dingbats, flags, keycaps, variation selectors, ZWJ, skin tones) become a space.
* Whitespace: every run of whitespace becomes one space, leading/trailing whitespace is dropped, and
  no space is kept before closing punctuation (``.,!?;:)]}`` and their CJK forms, ``”’``) or after
  CJK punctuation (``。，！？；：、`` and CJK opening brackets/quotes).
  A line break after a line ending in a letter/digit/CJK character first gets a stop
  (``。`` if that line holds CJK, else ``.``), so headings and list items end as sentences.
* Control characters other than tab/newline/CR are dropped.
"""
from __future__ import annotations

import unicodedata

MD_ESCAPABLE = frozenset("\\`*_{}[]()#+-.!|~>")
# Closing punctuation: a pending space before it is dropped ("done 😀." -> "done.").
NO_SPACE_BEFORE = frozenset(".,!?;:)]}。，！？；：、）」』】》”’")
NO_SPACE_AFTER = frozenset("。，！？；：、（「『【《“‘")
LINK_TEXT_MAX = 300
LINK_URL_MAX = 1000


def is_cjk(c: str) -> bool:
    """CJK ideographs (incl. extension A and compatibility), kana and hangul syllables."""
    o = ord(c)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x3040 <= o <= 0x30FF or 0xAC00 <= o <= 0xD7AF)


def is_emoji(c: str) -> bool:
    """Pictographic emoji and their joiners/modifiers (not letters, digits or ordinary symbols)."""
    o = ord(c)
    return (0x1F000 <= o <= 0x1FAFF or 0x2600 <= o <= 0x27BF or 0x2B00 <= o <= 0x2BFF
            or 0x1F1E6 <= o <= 0x1F1FF or o in (0xFE0F, 0xFE0E, 0x200D, 0x20E3, 0x2B50, 0x2B55,
                                                0x231A, 0x231B, 0x23F0, 0x23F3, 0x3030, 0x303D)
            or 0xE0020 <= o <= 0xE007F)


def _speakable(c: str) -> bool:
    return c.isalnum()


class MarkdownCleaner:
    """Incremental form of ``clean_text``: ``feed`` returns the cleaned text that became certain,
    ``finish`` the rest. Concatenated outputs equal ``clean_text`` of the concatenated input."""

    def __init__(self) -> None:
        self._raw = ""                 # input not yet consumed
        self._line_start = True
        self._table_row = False
        self._fence: str | None = None  # the opening fence while inside a code block
        self._last_visible = ""        # last non-space character produced
        self._line_cjk = False         # the current output line holds CJK
        self._space_pending = False    # a space to emit before the next visible character
        self._out: list[str] = []

    def feed(self, text: str) -> str:
        """Add raw text; return newly certain cleaned text."""
        self._raw += text
        return self._scan(final=False)

    def finish(self) -> str:
        """End of input: resolve everything still held back; return the remaining cleaned text."""
        out = self._scan(final=True)
        self._space_pending = False
        return out

    def drain(self) -> str:
        """Resolve held-back constructs as if the input ended here, but keep block state (used by
        ``flush``: the stream goes on, e.g. inside a code block)."""
        return self._scan(final=True)

    # -- output -----------------------------------------------------------------------------------

    def _emit(self, s: str) -> None:
        for c in s:
            if c.isspace():
                if self._last_visible:
                    self._space_pending = True
                continue
            if self._space_pending and c not in NO_SPACE_BEFORE and self._last_visible not in NO_SPACE_AFTER:
                self._out.append(" ")
            self._space_pending = False
            self._out.append(c)
            self._last_visible = c
            if is_cjk(c):
                self._line_cjk = True

    def _line_break(self) -> None:
        if self._last_visible and _speakable(self._last_visible):
            self._space_pending = False
            self._emit("。" if self._line_cjk else ".")
        self._emit(" ")
        self._line_start, self._table_row, self._line_cjk = True, False, False

    # -- scanning ---------------------------------------------------------------------------------

    def _scan(self, final: bool) -> str:
        raw, i = self._raw, 0
        while i < len(raw):
            if self._fence is not None:
                j = raw.find("\n", i)
                if j < 0 and not final:
                    break
                line = raw[i:] if j < 0 else raw[i:j]
                stripped = line.strip()
                if stripped.startswith(self._fence) and set(stripped) == {self._fence[0]}:
                    self._fence = None
                    self._line_start = True
                i = len(raw) if j < 0 else j + 1
                continue
            if self._line_start:
                j = self._line_prefix(raw, i, final)
                if j is None:
                    break
                i = j
                continue
            j = self._inline(raw, i, final)
            if j is None:
                break
            i = j
        self._raw = raw[i:]
        out, self._out = "".join(self._out), []
        return out

    def _line_prefix(self, raw: str, i: int, final: bool) -> int | None:
        """At a line start: consume block markers; return the next index (None: need more input)."""
        n = len(raw)
        j = i
        while j < n and raw[j] in " \t":
            j += 1
        if j == n:
            return None if not final else n
        c = raw[j]
        eol = raw.find("\n", j)
        line_end = n if eol < 0 else eol
        line_complete = eol >= 0 or final
        if c in "`~":
            k = j
            while k < n and raw[k] == c:
                k += 1
            if k == n and not final:
                return None
            if k - j >= 3:
                if not line_complete:
                    return None
                self._fence = c * (k - j)
                return n if eol < 0 else eol + 1
        if c == "#":
            k = j
            while k < n and raw[k] == "#":
                k += 1
            if k == n and not final:
                return None
            if k - j <= 6 and (k == n or raw[k] in " \t\n"):
                self._line_start = False
                return k
        if c == ">":
            return j + 1          # stay at line start: "> - item" nests
        if c in "-*_":
            # Horizontal rule? Needs the line up to its first non-rule character.
            k = j
            while k < line_end and raw[k] in (c, " ", "\t"):
                k += 1
            if k == line_end and not line_complete:
                return None
            if k == line_end and raw[j:line_end].count(c) >= 3:
                return line_end if eol < 0 else eol + 1   # dropped; previous break already spoken
            if c in "-*" and j + 1 < n and raw[j + 1] in " \t":
                self._line_start = False
                return j + 2
            if c in "-*" and j + 1 == n and not final:
                return None
        if c == "+":
            if j + 1 == n and not final:
                return None
            if j + 1 < n and raw[j + 1] in " \t":
                self._line_start = False
                return j + 2
        if c.isdigit():
            k = j
            while k < n and raw[k].isdigit() and k - j < 4:
                k += 1
            if k + 1 >= n and not final:
                return None
            if k - j <= 3 and k + 1 < n and raw[k] in ".)" and raw[k + 1] in " \t":
                self._line_start = False
                return k + 2
        if c == "|":
            k = j
            while k < line_end and raw[k] in "|-: \t":
                k += 1
            if k == line_end and not line_complete:
                return None
            if k == line_end and "-" in raw[j:line_end]:
                return line_end if eol < 0 else eol + 1   # separator row
            self._line_start, self._table_row = False, True
            return j + 1
        self._line_start = False
        return j

    def _inline(self, raw: str, i: int, final: bool) -> int | None:
        """Consume one inline item at ``i``; return the next index (None: need more input)."""
        n = len(raw)
        c = raw[i]
        if c == "\n":
            self._line_break()
            return i + 1
        if c.isspace():
            self._emit(" ")
            return i + 1
        if unicodedata.category(c) == "Cc":
            return i + 1
        if c == "\\":
            if i + 1 == n and not final:
                return None
            if i + 1 < n and raw[i + 1] in MD_ESCAPABLE:
                self._emit(raw[i + 1])
                return i + 2
            self._emit(c)
            return i + 1
        if c in "*`":
            return i + 1
        if c in "~_":
            k = i
            while k < n and raw[k] == c:
                k += 1
            if k == n and not final:
                return None
            if c == "~":
                if k - i == 1:
                    self._emit(c)
                return k
            joins = (self._last_visible.isalnum() and not self._space_pending
                     and k < n and raw[k].isalnum())
            if joins:
                self._emit(raw[i:k])
            return k
        if c == "|" and self._table_row:
            k = i + 1
            while k < n and raw[k] in " \t":
                k += 1
            if k == n and not final:
                return None
            if k < n and raw[k] != "\n":
                self._space_pending = False
                self._emit(", ")
            return k
        if c == "!" or c == "[":
            start = i + 1 if c == "!" else i
            if c == "!":
                if start == n and not final:
                    return None
                if start == n or raw[start] != "[":
                    self._emit(c)
                    return i + 1
            link = self._link(raw, start, final)
            if link is None:
                return None
            if link is False:
                self._emit(c)
                return i + 1
            text, end = link
            if c == "[":
                self._emit(clean_inline(text))
            return end
        if is_emoji(c):
            self._emit(" ")
            return i + 1
        self._emit(c)
        return i + 1

    @staticmethod
    def _link(raw: str, i: int, final: bool):
        """``raw[i] == '['``: (text, end index) of ``[text](url)``, False if not a link, None to wait."""
        n = len(raw)
        close = -1
        for k in range(i + 1, min(n, i + 1 + LINK_TEXT_MAX)):
            if raw[k] == "\n":
                return False
            if raw[k] == "]":
                close = k
                break
        if close < 0:
            return None if (n < i + 1 + LINK_TEXT_MAX and not final) else False
        if close + 1 == n:
            return None if not final else False
        if raw[close + 1] != "(":
            return False
        for k in range(close + 2, min(n, close + 2 + LINK_URL_MAX)):
            if raw[k] in "\n ":
                return False
            if raw[k] == ")":
                return raw[i + 1:close], k + 1
        return None if (n < close + 2 + LINK_URL_MAX and not final) else False


def clean_inline(text: str) -> str:
    """Inline rules only (no line-start markers), on complete text."""
    c = MarkdownCleaner()
    c._line_start = False
    return c.feed(text) + c.finish()


def clean_text(text: str) -> str:
    """The whole-text form of the cleaning rule (module docstring)."""
    c = MarkdownCleaner()
    return c.feed(text) + c.finish()
