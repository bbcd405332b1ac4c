"""Incremental segmentation of streamed chatbot text into synthesis segments.

Text arrives in arbitrary fragments (one character, half a number, a markdown link ...). It is
cleaned by ``MarkdownCleaner`` (markdown, emoji and code rule in ``engine/frontend/markdown.py``)
and cut into segments as soon as a cut is certain to be safe:

* **Cut points** are only (a) right after a run of punctuation (plus closing quotes/brackets), or
  (b) for over-long text without punctuation, a space between two letters, or a point between two
  CJK characters. ASCII ``. , : ; ! ?`` count only when followed by a space or a CJK character, so
  ``3.14``, ``1,234``, ``10:30``, ``12/25/1990``, ``$12.50``, URLs and e-mail addresses never contain a
  cut; a ``.`` after an abbreviation (``Dr.``, ``e.g.``, ``U.S.``, initials ``J.``) is not a cut; a comma
  followed by a number (``Jan 3, 2024``) is not a cut; a space next to a digit is never a cut, and no
  cut ever falls inside a word. Deciding a cut needs up to two characters after it, so the segmenter
  waits for them (``flush``/``end`` resolve the wait).
* **Length** is measured in units: one per CJK character, two per other word (so 8 units = 8 Chinese
  characters = 4 English words).
* **First segment** (early, for latency): the first clause or sentence cut with >= ``first_min_units``;
  if none by ``first_max_units``, the last safe cut before that point.
* **Later segments** (sentence-sized, for prosody): the first sentence cut with >= ``min_units``; if
  none by ``max_units``, the last clause cut (else the last space / CJK cut) before that point.
* **Delays**: ``poll(now)`` emits up to the last safe cut once the oldest buffered text has waited
  ``first_max_delay_s`` (first segment) or ``max_delay_s`` (later ones) and has >= ``delay_min_units``.
* ``flush()`` emits everything buffered (held-back markdown resolved); ``end()`` emits the rest and
  closes the segmenter. Segments with no letter/digit/CJK character are never emitted (at ``end``
  such a remainder is dropped; otherwise it stays buffered and prefixes the next segment).

Without ``poll``/``flush`` the segments depend only on the text, not on how it was fragmented, and
their concatenation equals ``clean_text(whole input)`` up to a dropped unspeakable tail.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from engine.frontend.markdown import MarkdownCleaner, is_cjk

SENTENCE_MARKS = frozenset("。！？!?；;…")
CLAUSE_MARKS = frozenset("，,、：:")
CLOSERS = frozenset("\"'”’)）」』】》")
RUN_CHARS = SENTENCE_MARKS | CLAUSE_MARKS | CLOSERS | {"."}
ASCII_MARKS = frozenset(".,:;!?")
# A "." after these (case-insensitive) does not end a sentence ("etc." and "Inc." usually do).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs fig figs approx dept est ltd co corp jan feb apr jun jul aug sep "
    "sept oct nov dec".split())


@dataclass
class SegmenterConfig:
    first_min_units: int = 8        # >= 8 zh chars or >= 4 en words at a clause mark
    first_max_units: int = 24       # no clause mark by then: cut at the last space/CJK boundary
    min_units: int = 30             # later segments: cut at a sentence end once this long
    max_units: int = 120            # ... or at the last clause / space boundary beyond this
    first_max_delay_s: float = 0.8  # poll(): release a partial first segment after this wait
    max_delay_s: float = 2.5        # poll(): same for later segments
    delay_min_units: int = 2        # poll() never releases less than this


def units(text: str) -> int:
    """Speakable length: 1 per CJK character, 2 per other word (run of letters/digits)."""
    n, in_word = 0, False
    for c in text:
        if is_cjk(c):
            n += 1
            in_word = False
        elif c.isalnum():
            if not in_word:
                n += 2
            in_word = True
        else:
            in_word = False
    return n


def is_speakable(text: str) -> bool:
    return any(c.isalnum() for c in text)


@dataclass
class _Scan:
    cut: int | None             # the rule-based cut (None: none yet)
    candidates: list[tuple[int, str, int]]  # safe cuts seen: (position, kind, units before it);
    # kind is "sentence", "clause", "space" or "cjk"


def _word_before(buf: str, p: int) -> str:
    k = p
    while k > 0 and not buf[k - 1].isspace() and buf[k - 1] not in "\"'“‘(（[":
        k -= 1
    return buf[k:p]


def _period_is_stop(buf: str, p: int) -> bool:
    """``buf[p] == '.'`` followed by a space: does it end a sentence (not an abbreviation)?"""
    word = _word_before(buf, p)
    if not word:
        return True
    if "." in word:                     # e.g. i.e. U.S. a.m. (but not 12.50. or example.com.)
        parts = word.split(".")
        return not all(part.isalpha() and len(part) <= 2 for part in parts)
    if len(word) == 1 and word.isalpha() and word.isupper():   # initials: J. K. Rowling
        return False
    return word.lower() not in ABBREVIATIONS


def _scan(buf: str, first: bool, cfg: SegmenterConfig, final: bool) -> _Scan:
    """Find the first cut of ``buf`` (which starts a segment) under the rules of the module doc."""
    min_u = cfg.first_min_units if first else cfg.min_units
    max_u = cfg.first_max_units if first else cfg.max_units
    candidates: list[tuple[int, str, int]] = []
    n = len(buf)
    u, in_word = 0, False
    p = 0
    while p < n:
        c = buf[p]
        if c in RUN_CHARS and c not in CLOSERS:
            q = p
            while q < n and buf[q] in RUN_CHARS:
                q += 1
            if q == n and not final:
                break                      # the character after the run decides
            kind = _run_kind(buf, p, q, final)
            if kind == "wait":
                break
            if kind is not None and q < n:
                candidates.append((q, kind, u))
                if u >= max(min_u, 1) and (kind == "sentence" or first):
                    return _Scan(q, candidates)
            in_word = False
            p = q
            continue
        if c.isspace():
            if 0 < p < n - 1 and buf[p - 1].isalpha() and buf[p + 1].isalpha():
                candidates.append((p, "space", u))
            in_word = False
        elif is_cjk(c):
            if p > 0 and is_cjk(buf[p - 1]):
                candidates.append((p, "cjk", u))
            u += 1
            in_word = False
        elif c.isalnum():
            if not in_word:
                u += 2
            in_word = True
        else:
            in_word = False
        if u > max_u:
            cut = _best_forced(candidates, cfg.first_min_units)
            if cut is not None:
                return _Scan(cut, candidates)
        p += 1
    return _Scan(None, candidates)


def _run_kind(buf: str, p: int, q: int, final: bool) -> str | None:
    """Kind of the cut after punctuation run ``buf[p:q]``: "sentence", "clause", None or "wait"."""
    run = buf[p:q]
    marks = [c for c in run if c not in CLOSERS]
    nxt = buf[q] if q < len(buf) else ""
    if marks[-1] in ASCII_MARKS and nxt and not (nxt.isspace() or is_cjk(nxt)):
        return None                        # 3.14  1,234  10:30  a.b@c.com  http://
    if marks == [","] and nxt.isspace():
        if q + 1 >= len(buf):
            return None if final else "wait"
        if buf[q + 1].isdigit():           # Jan 3, 2024 / 1, 2, 3
            return None
    if any(c in SENTENCE_MARKS for c in marks):
        return "sentence"
    if "." in marks:
        if len(marks) == 1 and not _period_is_stop(buf, p):
            return None
        return "sentence"
    return "clause" if marks else None


def _best_forced(candidates: list[tuple[int, str, int]], min_units: int) -> int | None:
    """Cut for an over-long segment: the last punctuation cut leaving >= ``min_units``, else the last
    space, else the last CJK boundary, else the last punctuation cut."""
    rules = (lambda k, u: k in ("sentence", "clause") and u >= min_units, lambda k, u: k == "space",
             lambda k, u: k == "cjk", lambda k, u: True)
    for rule in rules:
        pos = [q for q, k, u in candidates if u > 0 and rule(k, u)]
        if pos:
            return pos[-1]
    return None


class StreamingSegmenter:
    """Streamed text in, synthesis segments out (rules in the module docstring).

    One instance per stream; no threads, no shared state. ``now`` arguments are monotonic seconds
    (default ``time.monotonic()``)."""

    def __init__(self, config: SegmenterConfig | None = None):
        self.config = config or SegmenterConfig()
        self._cleaner = MarkdownCleaner()
        self._buf = ""                  # cleaned text not yet emitted
        self._first = True
        self._since: float | None = None  # arrival time of the oldest buffered text
        self._ended = False
        self.emitted_segments = 0

    def feed(self, fragment: str, now: float | None = None) -> list[str]:
        """Add a text fragment; return the segments that became ready (possibly none)."""
        if self._ended:
            raise RuntimeError("segmenter already ended")
        now = time.monotonic() if now is None else now
        return self._append(self._cleaner.feed(fragment), now, final=False)

    def poll(self, now: float | None = None) -> list[str]:
        """Apply the max-delay rule: if the buffered text waited too long, emit it up to its last
        safe cut. Call periodically (e.g. every 50 ms) and after ``feed``."""
        if self._ended or self._since is None or not self._buf:
            return []
        now = time.monotonic() if now is None else now
        limit = self.config.first_max_delay_s if self._first else self.config.max_delay_s
        if now - self._since < limit:
            return []
        scan = _scan(self._buf, self._first, self.config, final=False)
        for q, _, u in reversed(scan.candidates):
            if u >= self.config.delay_min_units:
                return self._emit_upto(q, now)
        return []

    def flush(self, now: float | None = None) -> list[str]:
        """Emit everything buffered (held-back markdown is resolved as if the input ended)."""
        if self._ended:
            return []
        now = time.monotonic() if now is None else now
        out = self._append(self._cleaner.drain(), now, final=True)
        if is_speakable(self._buf):
            out += self._emit_upto(len(self._buf), now)
        return out

    def end(self, now: float | None = None) -> list[str]:
        """End of input: emit the rest; the segmenter accepts no more text afterwards."""
        if self._ended:
            return []
        now = time.monotonic() if now is None else now
        out = self._append(self._cleaner.finish(), now, final=True)
        if is_speakable(self._buf):
            out += self._emit_upto(len(self._buf), now)
        self._buf, self._ended = "", True
        return out

    @property
    def buffered(self) -> str:
        """Cleaned text waiting for a cut."""
        return self._buf

    def _append(self, cleaned: str, now: float, final: bool) -> list[str]:
        if cleaned:
            if not self._buf:
                self._since = now
            self._buf += cleaned
        out: list[str] = []
        while self._buf:
            cut = _scan(self._buf, self._first, self.config, final).cut
            if cut is None:
                break
            out += self._emit_upto(cut, now)
        return out

    def _emit_upto(self, q: int, now: float) -> list[str]:
        seg, self._buf = self._buf[:q], self._buf[q:]
        self._since = now if self._buf else None
        self._first = False
        self.emitted_segments += 1
        return [seg]
