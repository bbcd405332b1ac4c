"""Chunk planning, deadline ordering and budget packing (pure functions, no torch).

Units: tokens are speech tokens (25 per second of audio, 2 mel frames each); times are seconds on
one monotonic clock; slack is seconds of audio the client still has buffered (negative: an underrun
is in progress).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

TOKENS_PER_SECOND = 25
FRAMES_PER_TOKEN = 2


@dataclass
class ChunkPolicy:
    """How many tokens each chunk voices.

    first chunk of an utterance: ``first_chunk_tokens`` (+ ``lookahead`` context tokens held back); a
    stream's very first chunk that had to wait for the worker voices the tokens that arrived
    meanwhile, up to ``first_chunk_max_tokens`` (None: exactly ``first_chunk_tokens``); later chunks:
    ``min_chunk_tokens`` while the client's buffer is short, growing with the playback slack
    (``slack_fraction`` of the buffered audio, in tokens) up to ``max_chunk_tokens``.
    ``fixed_hops`` (tests, golden schedules): the hop of chunk k is ``fixed_hops[min(k, len-1)]``.
    """
    first_chunk_tokens: int = 15
    first_chunk_max_tokens: int | None = None
    lookahead: int = 3
    min_chunk_tokens: int = 15
    max_chunk_tokens: int = 100
    slack_fraction: float = 0.5
    fixed_hops: list[int] | None = None

    def hop(self, chunk_index: int, slack_s: float | None, available: int | None = None,
            llm_done: bool = False) -> int:
        """Tokens the next chunk of an utterance voices (before its lookahead).

        ``available``: tokens of the utterance not voiced yet. Every chunk re-runs the flow over the
        prompt and the whole prefix, so a chunk's cost hardly depends on how many new tokens it
        voices: a due chunk takes every available token (up to ``max_chunk_tokens``), which saves
        later prefix recomputations, above all when a stream has fallen behind. A stream's very first
        chunk (no audio yet: ``slack_s`` None) is planned as soon as ``first_chunk_tokens`` exist; if
        more arrived while it waited, it voices them too, up to ``first_chunk_max_tokens``: the same
        call then buys the client more audio before the next chunk is due. When the LLM is done and
        the rest fits one chunk, the hop covers it all, so the final call voices it."""
        if self.fixed_hops:
            return self.fixed_hops[min(chunk_index, len(self.fixed_hops) - 1)]
        take = None if available is None else (available if llm_done else available - self.lookahead)
        if slack_s is None:
            top = max(self.first_chunk_tokens, self.first_chunk_max_tokens or 0)
            return self.first_chunk_tokens if take is None else max(self.first_chunk_tokens, min(top, take))
        base = self.first_chunk_tokens if chunk_index == 0 else self.min_chunk_tokens
        want = base
        if slack_s > 0:
            want = max(base, min(self.max_chunk_tokens, int(slack_s * TOKENS_PER_SECOND * self.slack_fraction)))
        if take is not None:
            want = max(want, min(self.max_chunk_tokens, take))
        return want


@dataclass(frozen=True)
class ChunkPlan:
    """One token2wav call: flow over ``tokens[:token_end]``, emit frames from ``2*token_offset``."""
    token_end: int
    token_offset: int
    final: bool


def plan_chunk(n_tokens: int, token_offset: int, llm_done: bool, hop: int, lookahead: int) -> ChunkPlan | None:
    """The next call for an utterance holding ``n_tokens`` tokens, ``token_offset`` already voiced.

    Non-final when ``hop + lookahead`` new tokens exist (upstream ``tts`` rule); otherwise the final
    call once the LLM is done (``None`` if nothing is left, or if more tokens must be awaited).
    """
    remaining = n_tokens - token_offset
    if remaining >= hop + lookahead:
        return ChunkPlan(token_offset + hop + lookahead, token_offset, final=False)
    if llm_done and remaining > 0:
        return ChunkPlan(n_tokens, token_offset, final=True)
    return None


def schedule_all(n_tokens: int, hops: Sequence[int], lookahead: int = 3) -> list[ChunkPlan]:
    """The whole call list when every token is available (golden ``schedules`` rule)."""
    policy = ChunkPolicy(lookahead=lookahead, fixed_hops=list(hops))
    plans, offset, k = [], 0, 0
    while True:
        p = plan_chunk(n_tokens, offset, True, policy.hop(k, None), lookahead)
        if p is None:
            return plans
        plans.append(p)
        if p.final:
            return plans
        offset, k = offset + (p.token_end - lookahead - offset), k + 1


def chunk_samples(plan: ChunkPlan, first_of_utterance: bool, lookahead: int = 3,
                  samples_per_token: int = 960, held_back: int = 3840) -> int:
    """Samples a call emits: non-final ``hop·960`` (minus the 3840 held back on the first call);
    final: every remaining sample, plus the 3840 held back by the previous call if there was one."""
    if not plan.final:
        hop = plan.token_end - lookahead - plan.token_offset
        return hop * samples_per_token - (held_back if first_of_utterance else 0)
    n = (plan.token_end - plan.token_offset) * samples_per_token
    return n if first_of_utterance else n + held_back


@dataclass
class PlaybackClock:
    """The client's playback buffer as the server models it (audio plays as soon as it arrives).

    ``play_end`` is the wall time the client runs out of audio; a chunk arriving after it is an
    underrun (playback stalls until the chunk arrives).
    """
    play_end: float | None = None
    audio_s: float = 0.0
    underruns: int = 0

    def slack(self, now: float) -> float | None:
        """Buffered seconds at ``now`` (None before the first audio)."""
        return None if self.play_end is None else self.play_end - now

    def deliver(self, now: float, seconds: float, count_underrun: bool = True) -> float | None:
        """Account a chunk of ``seconds`` arriving at ``now``; returns the slack it arrived with."""
        slack = self.slack(now)
        if slack is not None and slack < 0 and count_underrun:
            self.underruns += 1
        start = now if self.play_end is None else max(self.play_end, now)
        self.play_end = start + seconds
        self.audio_s += seconds
        return slack


@dataclass(order=True)
class Candidate:
    """A stream ready for a call this step. Sorted by ``deadline_key``; ``first_audio``: the call
    makes the stream's first audio (the stream is silent so far)."""
    deadline_key: tuple
    cost_frames: int = field(compare=False)
    stream_id: str = field(compare=False)
    plan: ChunkPlan = field(compare=False)
    first_audio: bool = field(default=False, compare=False)


def deadline_key(has_audio: bool, slack_s: float | None, waiting_since: float) -> tuple:
    """First audio of a stream first (oldest first), then least playback slack."""
    if not has_audio:
        return (0, waiting_since)
    return (1, slack_s if slack_s is not None else -math.inf)


def flow_cost_frames(prompt_tokens: int, plan: ChunkPlan, lookahead: int = 3) -> int:
    """Mel frames the flow decoder computes for ``plan`` (prompt + prefix + new; no lookahead)."""
    end = plan.token_end if plan.final else plan.token_end - lookahead
    return FRAMES_PER_TOKEN * (prompt_tokens + end)


def row_padded_cost(rows: int, frames: int) -> int:
    """Frames a batched flow call computes when every row is padded to the longest one."""
    return rows * frames


def pack(candidates: Sequence[Candidate], frame_budget: int, max_batch: int,
         urgent_frame_budget: int | None = None,
         padded_cost: Callable[[int, int], int] = row_padded_cost) -> list[Candidate]:
    """Candidates in deadline order, greedily, while the padded batch fits ``frame_budget``.

    A batched flow call pads every row to the longest one, so the cost of a batch is
    ``padded_cost(rows, max(cost_frames))``: ``rows × longest``, or more where the flow pads further
    (CUDA-graph buckets: a stream that still fits the bucket costs nothing). The most urgent candidate is
    always taken (even over budget) so that no stream starves; later ones that do not fit are skipped
    in favour of cheaper ones behind them. When the most urgent candidate is a stream's first audio,
    ``urgent_frame_budget`` (if given) replaces the budget, keeping that step short."""
    chosen: list[Candidate] = []
    longest = 0
    ordered = sorted(candidates)
    if ordered and urgent_frame_budget is not None and ordered[0].first_audio:
        frame_budget = min(frame_budget, urgent_frame_budget)
    for c in ordered:
        if len(chosen) >= max_batch:
            break
        if chosen and padded_cost(len(chosen) + 1, max(longest, c.cost_frames)) > frame_budget:
            continue
        chosen.append(c)
        longest = max(longest, c.cost_frames)
    return chosen
