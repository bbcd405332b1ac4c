"""The CosyVoice2 bistream algorithm (cosyvoice2.md §2.8, golden README §4.3) as a state machine.

It owns no model: a driver (the torch backend, a vLLM backend, a golden test) asks it what to feed,
runs the forward, asks whether a fill is forced, samples otherwise, and reports the chosen id::

    sm = BistreamState(prompt_text_ids, prompt_speech_tokens)
    while not sm.done:
        feed = sm.next_input()            # unified ids, or None: wait for push_text()/end_text()
        if feed is None: <wait for text>; continue
        logp = forward(feed)
        tok = FILL if sm.fill_due() else sample(logp, sm.out_tokens, ignore_eos=sm.ignore_eos)
        if sm.accept(tok) is Outcome.EMIT: yield tok

All upstream quirks are kept: text is consumed one id at a time; prompt speech is interleaved in
(5 text, 15 speech) blocks; after a fill only the next 5 text ids are fed (the fill's embedding never
is); at end of text the pending input (after a fill: the last speech id again, already fed once),
the leftover text and task_id are fed together; leftover prompt speech is dropped there.
"""
from __future__ import annotations

from collections import deque
from enum import Enum

from engine.llm.ids import EOS, FILL, SOS_ID, TASK_ID, text_to_unified


class Outcome(Enum):
    EMIT = "emit"    # a speech token: deliver it
    FILL = "fill"    # a fill token: the machine now waits for text
    STOP = "stop"    # end of decoding (eos in the final phase, or an invalid id when not strict)


class BistreamError(ValueError):
    """An id upstream raises on (eos/eos2 while streaming text, eos2/fill in the final phase)."""


class BistreamState:
    def __init__(self, prompt_text_ids: list[int], prompt_speech_tokens: list[int],
                 mix_ratio: tuple[int, int] | list[int] = (5, 15), strict: bool = True):
        """``prompt_text_ids`` text ids (plain, not unified); ``prompt_speech_tokens`` speech ids.
        ``strict``: raise BistreamError on ids upstream raises on; otherwise treat them as STOP."""
        self.n_text, self.n_speech = int(mix_ratio[0]), int(mix_ratio[1])
        self.strict = strict
        self.out_tokens: list[int] = []      # every accepted id, fills included (the sampler history)
        self._lm_input: list[int] = [SOS_ID]
        self._text_cache: list[int] = text_to_unified(list(prompt_text_ids))
        self._prompt_speech: list[int] = list(prompt_speech_tokens)
        p = len(self._prompt_speech)
        self.next_fill_index = (p // self.n_speech + 1) * self.n_speech - p
        self._pending: deque[int] = deque()
        self._text_ended = False
        self._phase = "text"                 # text -> decode <-> text ... -> final -> done
        self.text_consumed = 0               # target text ids consumed so far

    # -- text input -------------------------------------------------------------------------------
    def push_text(self, text_ids: list[int]) -> None:
        """Queue target text ids (plain ids) in arrival order."""
        if self._text_ended:
            raise RuntimeError("push_text after end_text")
        self._pending.extend(text_ids)

    def end_text(self) -> None:
        """No more text will come."""
        self._text_ended = True

    # -- driving ----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._phase == "done"

    @property
    def text_ended(self) -> bool:
        return self._text_ended

    @property
    def final_phase(self) -> bool:
        return self._phase == "final"

    @property
    def ignore_eos(self) -> bool:
        """Whether the sampler must mask eos for the current forward (True while text streams)."""
        return self._phase != "final"

    def next_input(self) -> list[int] | None:
        """Unified ids for the next forward, or None when text must arrive first (or when done).

        Consumes queued text one id at a time until there is something to feed."""
        if self._phase in ("decode", "final"):
            return list(self._lm_input)
        while self._phase == "text":
            if self._pending:
                self._consume(self._pending.popleft())
            elif self._text_ended:
                self._lm_input = self._lm_input + self._text_cache + [TASK_ID]
                self._text_cache = []
                self._phase = "final"
            else:
                return None
        return None if self.done else list(self._lm_input)

    def fill_due(self) -> bool:
        """After a forward in the text phase: a fill is forced here (the sampler is not called)."""
        return self._phase == "decode" and len(self.out_tokens) == self.next_fill_index

    def accept(self, token: int) -> Outcome:
        """Record the id chosen after the last forward (sampled, or FILL when ``fill_due()``)."""
        if self._phase not in ("decode", "final"):
            raise RuntimeError(f"accept() in phase {self._phase}")
        if self._phase == "decode" and token == FILL:
            self.next_fill_index = len(self.out_tokens) + self.n_speech + 1
        self.out_tokens.append(token)
        if token < EOS:
            self._lm_input = [token]
            return Outcome.EMIT
        if self._phase == "decode" and token == FILL:
            self._phase = "text"
            return Outcome.FILL
        if self._phase == "final" and token == EOS:
            self._phase = "done"
            return Outcome.STOP
        self._phase = "done"
        if self.strict:
            raise BistreamError(f"should not get token {token}")
        return Outcome.STOP

    def _consume(self, text_id: int) -> None:
        """Upstream's loop body for one incoming text id."""
        self.text_consumed += 1
        self._text_cache.extend(text_to_unified([text_id]))
        while self._prompt_speech and len(self._text_cache) >= self.n_text:
            self._lm_input = (self._lm_input + self._text_cache[:self.n_text]
                              + self._prompt_speech[:self.n_speech])
            self._text_cache = self._text_cache[self.n_text:]
            self._prompt_speech = self._prompt_speech[self.n_speech:]
        if self._prompt_speech:
            return
        after_fill = bool(self.out_tokens) and self.out_tokens[-1] == FILL
        if after_fill or (not self.out_tokens and len(self._lm_input) == 1):
            if len(self._text_cache) < self.n_text:
                return
            head = self._text_cache[:self.n_text]
            self._lm_input = head if after_fill else self._lm_input + head
            self._text_cache = self._text_cache[self.n_text:]
        self._phase = "decode"
