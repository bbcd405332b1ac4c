"""CosyVoice2 bistream (cosyvoice2.md §2.8) as a sequence of decode *chunks*, for vLLM.

Upstream interleaves pulling text ids with decoding. Between two pulls the decoder runs until it
emits a fill token (6563), so the work splits into chunks: feed some ids, then decode until a stop.
``BistreamPlanner`` reproduces upstream's decisions exactly, one pulled text id at a time:

* streaming chunks feed ``[sos] + prompt text/speech mix`` or, after a fill, the next 5 text ids;
  they decode with 6561/6562 masked, stop on a sampled fill, and force the fill at output index
  ``next_fill_index - len(out_tokens)``; the fill is never fed;
* the final chunk feeds ``lm_input + leftover text + [task_id]`` and stops on 6561..6563. Upstream
  quirk kept on purpose: ``lm_input`` there is the input of the *previous* forward (already in the KV
  cache), so it is fed a second time; leftover prompt speech, if the text ended early, is dropped.

A transport (vLLM streaming-input session or abort-and-resubmit) runs each chunk and reports its
sampled ids, ending with the fill or stop id, via ``finish_chunk``. All ids are unified ids.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.llm import ids as uid


@dataclass
class Chunk:
    ids: list[int]               # unified ids to feed before decoding
    final: bool                  # final phase: stop on 6561..6563, no masks, no forcing
    force_fill_at: int | None    # chunk-relative output index of the forced fill (streaming phase)
    history: list[int]           # out_tokens so far (RAS looks at the tail)
    mask_ids: list[int] = field(default_factory=list)

    @property
    def stop_ids(self) -> list[int]:
        return list(uid.STOP_IDS) if self.final else [uid.FILL]


class BistreamPlanner:
    """Upstream ``inference_bistream`` decisions; no model, no I/O.

    Usage: ``add_text(ids)`` / ``end_text()`` as text arrives; while idle call ``next_chunk()``
    (None = wait for more text, or done); after the transport ran a chunk call
    ``finish_chunk(sampled_ids)``. ``fed`` is every id fed so far, in order (the resubmit transport's
    prompt); ``done`` is True after the final chunk."""

    def __init__(self, prompt_text_ids: list[int], prompt_speech_tokens: list[int],
                 mix_ratio: tuple[int, int] = (5, 15)):
        self.n_text, self.n_speech = mix_ratio
        self.text_cache: list[int] = uid.text_to_unified(prompt_text_ids)
        self.speech_left: list[int] = list(prompt_speech_tokens)
        p = len(prompt_speech_tokens)
        self.next_fill_index = (p // self.n_speech + 1) * self.n_speech - p
        self.lm_input: list[int] = [uid.SOS_ID]
        self.out_tokens: list[int] = []
        self.fed: list[int] = []
        self.incoming: deque[int] = deque()
        self.text_ended = False
        self.text_pulled = 0          # target text ids consumed so far (prompt text excluded)
        self.done = False
        self._pending: Chunk | None = None

    def add_text(self, text_ids: list[int]) -> None:
        self.incoming.extend(uid.text_to_unified(text_ids))

    def end_text(self) -> None:
        self.text_ended = True

    def next_chunk(self) -> Chunk | None:
        if self.done or self._pending is not None:
            return None
        while self.incoming:
            self._pull(self.incoming.popleft())
            chunk = self._streaming_chunk()
            if chunk is not None:
                return self._issue(chunk)
        if self.text_ended:
            ids = self.lm_input + self.text_cache + [uid.TASK_ID]
            self.text_cache = []
            return self._issue(Chunk(ids, True, None, list(self.out_tokens)))
        return None

    def finish_chunk(self, sampled: list[int]) -> list[int]:
        """Record a chunk's sampled ids (ending with its fill/stop id, or cut by length); returns the
        speech tokens it produced (ids < 6561)."""
        chunk, self._pending = self._pending, None
        if chunk is None:
            raise RuntimeError("finish_chunk without a chunk in flight")
        speech = [t for t in sampled if t < uid.EOS]
        if chunk.final:
            self.done = True
        else:
            if not sampled or sampled[-1] != uid.FILL or any(t >= uid.EOS for t in sampled[:-1]):
                raise ValueError(f"streaming chunk must end with exactly one fill token, got {sampled}")
            for t in sampled:
                if t == uid.FILL:
                    self.next_fill_index = len(self.out_tokens) + self.n_speech + 1
                self.out_tokens.append(t)
            if len(sampled) >= 2:                 # the last forward fed the last speech token
                self.lm_input = [sampled[-2]]
        self.fed += sampled[:-1] if (sampled and sampled[-1] >= uid.EOS) else sampled
        return speech

    # -- upstream steps -------------------------------------------------------------------------
    def _pull(self, t: int) -> None:
        self.text_pulled += 1
        self.text_cache.append(t)
        while self.speech_left and len(self.text_cache) >= self.n_text:
            self.lm_input += self.text_cache[:self.n_text] + self.speech_left[:self.n_speech]
            self.text_cache = self.text_cache[self.n_text:]
            self.speech_left = self.speech_left[self.n_speech:]

    def _streaming_chunk(self) -> Chunk | None:
        if self.speech_left:
            return None
        after_fill = bool(self.out_tokens) and self.out_tokens[-1] == uid.FILL
        at_start = not self.out_tokens and self.lm_input == [uid.SOS_ID]
        if after_fill or at_start:
            if len(self.text_cache) < self.n_text:
                return None
            head = self.text_cache[:self.n_text]
            self.text_cache = self.text_cache[self.n_text:]
            self.lm_input = head if after_fill else self.lm_input + head
        return Chunk(list(self.lm_input), False, self.next_fill_index - len(self.out_tokens),
                     list(self.out_tokens), [uid.EOS, uid.EOS + 1])

    def _issue(self, chunk: Chunk) -> Chunk:
        self._pending = chunk
        self.fed += chunk.ids
        self.lm_input = list(chunk.ids)
        return chunk
