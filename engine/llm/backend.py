"""The interface every LLM backend (torch, vLLM) implements for the streaming engine.

A backend turns text ids into speech tokens (ids 0..6560 at 25 Hz). It never yields stop ids
(6561..6563) or fill tokens. All methods are called from the asyncio event loop; a backend does its
GPU work elsewhere (a worker thread or vLLM's engine process) and never blocks the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


@dataclass
class LLMRequest:
    """One synthesis request for the LLM stage.

    The prefix layout per mode (cosyvoice2.md §2.6) is
    ``[sos] + prompt_text_ids + text_ids + [task_id] + prompt_speech_tokens``:
    zero_shot fills all four; cross_lingual and sft leave prompt text and speech empty; instruct2
    puts the instruct ids (ending in <|endofprompt|>) in ``prompt_text_ids`` and no prompt speech.
    """
    request_id: str
    text_ids: list[int]
    prompt_text_ids: list[int] = field(default_factory=list)
    prompt_speech_tokens: list[int] = field(default_factory=list)
    # min_tokens: default int(2 * len(text_ids)), before which only eos (6561) is masked (upstream).
    # Given explicitly, no stop id ends the request before it (as vLLM's min_tokens; bistream too,
    # whose fill token stays allowed while text streams in) — random-weight benchmarks use this.
    min_tokens: int | None = None
    max_tokens: int | None = None   # default int(20 * len(text_ids)); bistream: safety bound only
    seed: int | None = None
    ras: bool = True                # repetition-aware sampling; False = plain top-p/top-k nucleus draw

    def length_bounds(self) -> tuple[int, int]:
        n = len(self.text_ids)
        lo = self.min_tokens if self.min_tokens is not None else int(n * 2)
        hi = self.max_tokens if self.max_tokens is not None else int(n * 20)
        return lo, hi


class LLMBackend(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def generate(self, request: LLMRequest) -> AsyncIterator[list[int]]:
        """Speech tokens of ``request`` as they are decoded (each yield: the new tokens)."""
        ...

    def generate_bistream(self, request: LLMRequest,
                          text_ids: AsyncIterator[list[int]]) -> AsyncIterator[list[int]]:
        """CosyVoice2 bistream decoding (cosyvoice2.md §2.8): text ids arrive while speech is decoded.

        ``request.text_ids`` is ignored; ``text_ids`` yields the target text ids as they become
        available and ends at end of input."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a running request now; its iterator ends. Unknown ids are ignored."""
        ...
