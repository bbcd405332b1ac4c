"""Streaming engine benchmark: N concurrent chatbot-like streams against one TTSEngine.

    python -m bench.engine_bench --model DIR --concurrency 1,16,64,128 --no-batching \\
        [--llm torch|vllm] [--device cuda] [--dtype bfloat16] [--out-json bench/results.json]
    python -m bench.engine_bench --tiny --concurrency 1,2 --text-chars 40 --max-run-s 10   # CPU / CI

Each stream registers nothing new (one shared voice), then pushes its text in word-sized fragments at
``--chars-per-s`` (a chatbot's output rate), ends, and consumes its events. Per run it reports

* time to first audio from the stream's first text fragment, and from the release of each segment
  (``SegmentEvent``) to that segment's first audio (first segment and all segments);
* playback slack per chunk, as a client playing audio the moment it arrives sees it: the audio it
  still had buffered when the chunk arrived; an **underrun** is a chunk arriving after the previous
  audio finished, counted only when the chunk's segment had been released before that moment
  (waiting for text the chatbot has not written yet is not the engine's fault);
* real-time factor per stream (wall time from first fragment to final chunk / audio seconds) and the
  total audio seconds produced per wall second; peak GPU memory (allocated and reserved by
  the engine process's caching allocator); the card and the date.

Random weights never stop the LLM, so the engine's ``fixed_tokens_per_char`` fixes each segment's
token count from its text length: ``--tokens-per-char`` (default 5/3 = 25 tokens per second of
speech at 15 characters per second, a typical English speaking rate).

``--no-batching`` adds a baseline run per concurrency in ``--baseline-concurrency`` with one stream
per flow/HiFT call (``max_batch=1``, like the seed project). Every run is bounded by ``--max-run-s``;
streams still running then are cancelled and counted as unfinished. Results: JSON and a Markdown
table (also printed last).

``--variant LABEL=YAML`` (repeatable) runs the whole plan once per variant, each on a fresh engine with
those config overrides; variants with the same LLM settings share the LLM backend, so an A/B of
flow/HiFT/scheduler settings pays vLLM's start (~2 min on an H100) once.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import platform
import random
import sys
import tempfile
import time
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine.api import SAMPLE_RATE, AudioChunk, SegmentEvent, StreamOptions  # noqa: E402

WORDS = ("the a of to and in that it is was for on are with as be at this have from or one had by "
         "word but not what all were we when your can said there use each which she do how their if "
         "will up other about out many then them these so some her would make like him into time has "
         "look two more write go see number no way could people my than first water been call who oil "
         "its now find long down day did get come made may part over new sound take only little work "
         "know place year live me back give most very after thing our just name good sentence man "
         "think say great where help through much before line right too mean old any same tell boy "
         "follow came want show also around form three small set put end does another well large must "
         "big even such because turn here why ask went men read need land different home us move try "
         "kind hand picture again change off play spell air away animal house point page letter mother "
         "answer found study still learn should world high every near add food between own below country "
         "plant last school father keep tree never start city earth eye light thought head under story").split()


def chatbot_text(chars: int, rng: random.Random) -> str:
    """Plausible assistant prose of about ``chars`` characters: sentences of 6-16 words, some commas."""
    out, n = [], 0
    while n < chars:
        k = rng.randint(6, 16)
        words = [rng.choice(WORDS) for _ in range(k)]
        if k > 9:
            words[rng.randint(3, k - 4)] += ","
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])
        out.append(s)
        n += len(s) + 1
    return " ".join(out)


def fragments(text: str) -> list[str]:
    """Word-sized pieces with their trailing space, as a chatbot's token stream arrives."""
    parts, cur = [], ""
    for c in text:
        cur += c
        if c == " ":
            parts.append(cur)
            cur = ""
    if cur:
        parts.append(cur)
    return parts


@dataclass
class StreamResult:
    first_text: float = 0.0
    ttfa_first_fragment: float | None = None
    segment_release: dict = field(default_factory=dict)     # index -> time
    segment_first_audio: dict = field(default_factory=dict)
    slacks: list = field(default_factory=list)
    underruns: int = 0
    underrun_chunks: list = field(default_factory=list)     # index of each late chunk in the stream
    chunks: int = 0
    audio_s: float = 0.0
    end: float | None = None
    finished: bool = False
    error: str | None = None
    stream_id: str = ""


async def run_stream(engine, opts: StreamOptions, text: str, chars_per_s: float, start_delay: float,
                     res: StreamResult) -> None:
    await asyncio.sleep(start_delay)
    stream = await engine.open_stream(opts)
    res.first_text = time.monotonic()
    res.stream_id = stream.stream_id

    async def feed():
        t = res.first_text
        for frag in fragments(text):
            stream.push_text(frag)
            t += len(frag) / chars_per_s
            await asyncio.sleep(max(0.0, t - time.monotonic()))
        stream.end()

    feeder = asyncio.ensure_future(feed())
    play_end = None
    try:
        async for ev in stream:
            now = time.monotonic()
            if isinstance(ev, SegmentEvent):
                res.segment_release[ev.index] = now
                continue
            if not isinstance(ev, AudioChunk) or len(ev.samples) == 0:
                if isinstance(ev, AudioChunk) and ev.final:
                    res.finished = True
                continue
            if res.ttfa_first_fragment is None:
                res.ttfa_first_fragment = now - res.first_text
            res.segment_first_audio.setdefault(ev.segment_index, now)
            if play_end is not None:
                slack = play_end - now
                res.slacks.append(slack)
                released = res.segment_release.get(ev.segment_index, now)
                if slack < 0 and released <= play_end:
                    res.underruns += 1
                    res.underrun_chunks.append(res.chunks)
            res.chunks += 1
            dur = len(ev.samples) / SAMPLE_RATE
            play_end = (now if play_end is None else max(play_end, now)) + dur
            res.audio_s += dur
            if ev.final:
                res.finished = True
        res.end = time.monotonic()
    except asyncio.CancelledError:
        stream.cancel()
        raise
    except Exception as exc:  # recorded, the run goes on
        res.error = repr(exc)
    finally:
        feeder.cancel()


TIMELINE = ("release_to_submit", "submit_to_tokens", "tokens_to_step", "step", "step_to_audio")


class LLMTimes:
    """Wraps the engine's LLM backend ``generate`` to time each request: when it was submitted and
    when its first ``first_chunk`` tokens had arrived (what the first flow call waits for)."""

    def __init__(self, backend, first_chunk: int):
        self.backend, self._generate = backend, backend.generate
        backend.generate = self.generate
        self.reset(first_chunk)

    def reset(self, first_chunk: int) -> None:
        """Forget every request (a new engine on the same backend numbers its streams anew)."""
        self.submitted: dict[str, float] = {}
        self.tokens_ready: dict[str, float] = {}
        self.first_chunk = first_chunk

    async def generate(self, req):
        self.submitted[req.request_id] = time.monotonic()
        n = 0
        async with aclosing(self._generate(req)) as tokens:
            async for toks in tokens:
                n += len(toks)
                if n >= self.first_chunk:
                    self.tokens_ready.setdefault(req.request_id, time.monotonic())
                yield toks


def first_chunk_timeline(results, steps, llm_times: LLMTimes) -> dict:
    """Median seconds between the stages of each stream's first audio (first segment): release ->
    LLM request submitted -> first-chunk tokens in -> flow/HiFT step starts -> step ends -> audio seen."""
    first_step = {}
    for s in steps:
        for sid in s.stream_ids:
            first_step.setdefault(sid, s)
    spans = {k: [] for k in TIMELINE}
    for r in results:
        rid, st = f"{r.stream_id}-0", first_step.get(r.stream_id)
        if st is None or rid not in llm_times.tokens_ready or 0 not in r.segment_first_audio:
            continue
        marks = [r.segment_release[0], llm_times.submitted[rid], llm_times.tokens_ready[rid], st.started,
                 st.started + st.seconds, r.segment_first_audio[0]]
        for name, a, b in zip(spans, marks, marks[1:]):
            spans[name].append(b - a)
    return {f"first_chunk_{k}_p50_s": pct(v, 50) for k, v in spans.items()}


def pct(values, q):
    return None if not values else float(np.percentile(np.asarray(values, dtype=float), q))


async def run_once(engine, concurrency: int, batching: bool, args, voice_id: str,
                   llm_times: LLMTimes, repeat: int = 0) -> dict:
    """One measured run of ``concurrency`` streams. ``repeat``: earlier runs of the same concurrency
    in this engine. A repeat gets other texts, because vLLM's prefix cache would skip an identical
    request's prefill. That probably explains an H100 c=1 first audio of 146 ms on its first run and
    117-130 ms on the repeats of the same text."""
    engine.scheduler.config.max_batch = engine.config.max_batch if batching else 1
    rng = random.Random(args.seed * 1000 + concurrency + 7919 * repeat)
    texts = [chatbot_text(args.text_chars, rng) for _ in range(concurrency)]
    delays = [rng.uniform(0, args.ramp_s) for _ in range(concurrency)]
    results = [StreamResult() for _ in range(concurrency)]
    opts = StreamOptions(voice_id=voice_id, input_mode=args.input_mode)
    if args.cuda:
        import torch
        torch.cuda.reset_peak_memory_stats()
    steps_before = engine.scheduler.step_count
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(run_stream(engine, opts, texts[i], args.chars_per_s, delays[i], results[i]))
             for i in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=args.max_run_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.monotonic() - t0
    for _ in range(100):                # let cancelled streams leave the scheduler
        await asyncio.sleep(0.05)
        if engine.scheduler.live_streams == 0:
            break
    n_steps = engine.scheduler.step_count - steps_before
    steps = list(engine.scheduler.steps)[-n_steps:] if n_steps > 0 else []

    first_rel = [r.segment_first_audio[0] - r.segment_release[0] for r in results
                 if 0 in r.segment_first_audio and 0 in r.segment_release]
    all_rel = [r.segment_first_audio[k] - r.segment_release[k] for r in results
               for k in r.segment_first_audio if k in r.segment_release]
    ttfa = [r.ttfa_first_fragment for r in results if r.ttfa_first_fragment is not None]
    slacks = [s for r in results for s in r.slacks]
    rtf = [(r.end - r.first_text) / r.audio_s for r in results if r.finished and r.end and r.audio_s]
    audio = sum(r.audio_s for r in results)
    out = {
        "concurrency": concurrency, "batching": batching, "input_mode": args.input_mode,
        "wall_s": round(wall, 3), "finished": sum(r.finished for r in results),
        "errors": [r.error for r in results if r.error][:5],
        "ttfa_from_release_first_segment_p50_s": pct(first_rel, 50),
        "ttfa_from_release_first_segment_p95_s": pct(first_rel, 95),
        "ttfa_from_release_all_segments_p50_s": pct(all_rel, 50),
        "ttfa_from_release_all_segments_p95_s": pct(all_rel, 95),
        "ttfa_from_first_fragment_p50_s": pct(ttfa, 50),
        "ttfa_from_first_fragment_p95_s": pct(ttfa, 95),
        "slack_p5_s": pct(slacks, 5), "slack_p50_s": pct(slacks, 50), "slack_min_s": min(slacks) if slacks else None,
        "underruns": sum(r.underruns for r in results),
        "streams_with_underruns": sum(r.underruns > 0 for r in results),
        # which audio chunk of its stream each late chunk was (0 = the first; 1 = the one after it ...)
        "underruns_by_chunk_index": dict(sorted(collections.Counter(
            min(k, 5) for r in results for k in r.underrun_chunks).items())),
        "rtf_p50": pct(rtf, 50), "rtf_p95": pct(rtf, 95),
        "audio_s": round(audio, 3), "audio_s_per_wall_s": round(audio / wall, 3) if wall else None,
        "flow_calls": len(steps), "mean_batch": float(np.mean([s.batch for s in steps])) if steps else None,
        "mean_step_s": float(np.mean([s.seconds for s in steps])) if steps else None,
        "p95_step_s": pct([s.seconds for s in steps], 95),
        # device time of the step's phases (CUDA events): compare with mean_step_s for host overhead
        "mean_flow_s": _mean_phase(steps, "flow"), "mean_hift_s": _mean_phase(steps, "hift"),
        # flow work per emitted mel frame: prompt + prefix recomputation and padding included
        "flow_frames_per_new_frame": (sum(s.frames for s in steps) / max(1, sum(s.new_frames for s in steps))
                                      if steps else None),
        **first_chunk_timeline(results, steps, llm_times),
    }
    if args.cuda:
        import torch
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def _mean_phase(steps, name: str) -> float | None:
    vals = [s.phases[name] for s in steps if name in s.phases]
    return float(np.mean(vals)) if vals else None


def fmt(v, scale=1.0, digits=0):
    if v is None:
        return "-"
    return f"{v * scale:.{digits}f}"


def markdown(meta: dict, runs: list[dict]) -> str:
    variants = any("variant" in r for r in runs)
    head, rule = ("| variant " if variants else "") + "| c | batching | ", ("|---" if variants else "") + "|---|---|"

    def run_key(r: dict) -> str:
        return (f"| {r.get('variant', '')} " if variants else "") + f"| {r['concurrency']} | {'yes' if r['batching'] else 'no'} | "

    lines = [f"Engine benchmark, {meta['date']}, {meta['device_name']} ({meta['device']}, flow dtype "
             f"{meta['dtype']}, LLM {meta['llm']}, input {meta['input_mode']}), model {meta['model']}; "
             f"text {meta['chars_per_s']} chars/s, {meta['text_chars']} chars/stream, "
             f"{meta['tokens_per_char']:.3f} speech tokens/char.", "",
             head + "TTFA release p50/p95 (ms) | TTFA all segs p95 (ms) | TTFA 1st fragment p50 (ms) "
             "| slack p5 (ms) | underruns (streams) | RTF p50 | audio s / wall s | mean batch | step / flow / HiFT ms | finished | peak GPU GiB alloc/reserved |",
             rule + "---|" * 11]
    for r in runs:
        lines.append(
            run_key(r) + f"{fmt(r['ttfa_from_release_first_segment_p50_s'], 1e3)}/{fmt(r['ttfa_from_release_first_segment_p95_s'], 1e3)} "
            f"| {fmt(r['ttfa_from_release_all_segments_p95_s'], 1e3)} "
            f"| {fmt(r['ttfa_from_first_fragment_p50_s'], 1e3)} | {fmt(r['slack_p5_s'], 1e3)} "
            f"| {r['underruns']} ({r['streams_with_underruns']}) | {fmt(r['rtf_p50'], 1, 2)} "
            f"| {fmt(r['audio_s_per_wall_s'], 1, 2)} | {fmt(r['mean_batch'], 1, 1)} "
            f"| {fmt(r['mean_step_s'], 1e3)} / {fmt(r['mean_flow_s'], 1e3)} / {fmt(r['mean_hift_s'], 1e3)} "
            f"| {r['finished']}/{r['concurrency']} "
            f"| {r.get('peak_gpu_memory_gib', '-')}/{r.get('peak_gpu_reserved_gib', '-')} |")
    lines += ["", "First audio of each stream's first segment, p50 ms per stage: release -> LLM request "
              "submitted -> first-chunk tokens in -> flow/HiFT step starts -> step ends -> audio seen.", "",
              head + " | ".join(s.replace("_", " ") for s in TIMELINE) + " |",
              rule + "---|" * len(TIMELINE)]
    for r in runs:
        lines.append(run_key(r) + " | ".join(fmt(r.get(f"first_chunk_{k}_p50_s"), 1e3) for k in TIMELINE) + " |")
    return "\n".join(lines) + "\n"


# Config keys that define the LLM backend: variants that agree on them share one (vLLM starts once).
BACKEND_KEYS = ("llm_backend", "model_dir", "device", "dtype", "vllm")


async def bench(args) -> tuple[dict, list[dict]]:
    """Every run of ``args`` (its concurrencies, then the baselines) once per ``--variant``; each
    variant is a fresh engine, on the previous variant's LLM backend when they share it."""
    from engine.engine import DEFAULT_CONFIG, EngineConfig
    overrides = dict(model_dir=str(args.model), device=args.device, dtype=args.dtype, llm_backend=args.llm,
                     seed=args.seed, fixed_tokens_per_char=args.tokens_per_char)
    if args.max_batch:
        overrides["max_batch"] = args.max_batch
    if args.frame_budget:
        overrides["flow_frame_budget"] = args.frame_budget
    if args.urgent_budget is not None:
        overrides["urgent_frame_budget"] = args.urgent_budget or None
    if args.no_cuda_graphs:
        overrides["cuda_graphs"] = False
    overrides.update(parse_settings(args.set))
    variants = args.variant or [("", {})]
    # Every variant's config first: a bad key fails now, not after the earlier variants' device time.
    configs = [EngineConfig.load(args.config or DEFAULT_CONFIG, **{**overrides, **v}) for _, v in variants]
    meta, runs, backend, backend_key, llm_times = None, [], None, None, None
    done: collections.Counter = collections.Counter()   # runs per (concurrency, batching) so far
    try:
        for (label, variant), cfg in zip(variants, configs):
            key = [getattr(cfg, k) for k in BACKEND_KEYS]
            if backend is not None and key != backend_key:
                await backend.close()
                backend = None
            engine, load_s = await start_engine(cfg, backend, args.prompt_s)
            backend, backend_key = engine.backend, key
            args.cuda = engine.models.device.type == "cuda"
            first_chunk = cfg.first_chunk_tokens + cfg.lookahead_tokens
            if llm_times is None or llm_times.backend is not backend:
                llm_times = LLMTimes(backend, first_chunk)
            else:
                llm_times.reset(first_chunk)
            try:
                if meta is None:
                    meta = bench_meta(args, engine, cfg, load_s)
                if label:
                    meta.setdefault("variants", {})[label] = {"overrides": variant, "load_s": round(load_s, 1)}
                await variant_runs(engine, args, llm_times, label, done, meta, runs)
            finally:
                await engine.close(keep_backend=True)
                del engine
                free_device_memory(args.cuda)
    finally:
        if backend is not None:
            await backend.close()
    return meta, runs


def parse_settings(items: list[str]) -> dict:
    """``KEY=YAML`` items (``--set``) as engine config overrides."""
    import yaml
    out = {}
    for item in items:        # e.g. max_chunk_tokens=200 or 'vllm={logits_processor: false}'
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def parse_variant(item: str) -> tuple[str, dict]:
    """``LABEL=YAML mapping`` (``--variant``), e.g. ``cache={prefix_cache_voices: 4}``."""
    import yaml
    label, _, value = item.partition("=")
    overrides = yaml.safe_load(value) if value.strip() else {}
    if not label or not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"--variant wants LABEL={{key: value, ...}}, got {item!r}")
    return label, overrides


async def start_engine(cfg, backend, prompt_s: float):
    """A started TTSEngine (on ``backend`` if given) with the benchmark voice; and its start seconds."""
    from engine.engine import TTSEngine
    from engine.tools.synthesize import synthetic_prompt_wav
    engine = TTSEngine(cfg, backend=backend)
    t0 = time.monotonic()
    await engine.start()
    load_s = time.monotonic() - t0
    await engine.register_voice("bench", "This is the prompt of the benchmark voice.",
                                synthetic_prompt_wav(prompt_s), overwrite=True)
    return engine, load_s


def bench_meta(args, engine, cfg, load_s: float) -> dict:
    device_name = platform.processor() or "cpu"
    if args.cuda:
        import torch
        device_name = torch.cuda.get_device_name(engine.models.device)
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device_name": device_name,
            "device": str(engine.models.device), "dtype": cfg.dtype, "llm": cfg.llm_backend, "model": str(args.model),
            "input_mode": args.input_mode, "chars_per_s": args.chars_per_s, "text_chars": args.text_chars,
            "tokens_per_char": args.tokens_per_char, "prompt_s": args.prompt_s, "load_s": round(load_s, 1),
            "max_run_s": args.max_run_s, "config": asdict(cfg)}


async def variant_runs(engine, args, llm_times: LLMTimes, label: str, done: collections.Counter,
                       meta: dict, runs: list[dict]) -> None:
    """The warm-up, then each measured run of the plan on ``engine``, tagged ``variant: label`` and
    appended to ``runs`` (and to ``--out-json`` at once: a call cut short keeps what it measured).
    ``done`` counts the runs of each (concurrency, batching) of earlier variants too, so that no run
    repeats the texts of another (vLLM's prefix cache would skip their prefill)."""
    if args.warmup:
        await run_once(engine, min(4, max(args.concurrency)), True, argparse.Namespace(
            **{**vars(args), "text_chars": 30, "max_run_s": min(30.0, args.max_run_s)}), "bench", llm_times)
    plan = [(c, True) for c in args.concurrency]
    if args.no_batching:
        plan += [(c, False) for c in args.baseline_concurrency]
    for c, batching in plan:
        r = await run_once(engine, c, batching, args, "bench", llm_times, done[c, batching])
        done[c, batching] += 1
        runs.append({"variant": label, **r} if label else r)
        if args.out_json:
            write_json(args.out_json, meta, runs)
        print(f"{label + ' ' if label else ''}c={c} batching={batching}: " + json.dumps({k: r[k] for k in (
            "ttfa_from_release_first_segment_p95_s", "underruns", "audio_s_per_wall_s", "finished",
            "mean_step_s", "mean_flow_s", "mean_hift_s") + tuple(f"first_chunk_{k}_p50_s" for k in TIMELINE)}),
            flush=True)


def write_json(path: str, meta: dict, runs: list[dict]) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))


def free_device_memory(cuda: bool) -> None:
    """Return a closed engine's GPU memory (models, CUDA graphs) before the next one loads."""
    import gc
    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (e.g. a full-size random checkpoint)")
    ap.add_argument("--tiny", action="store_true", help="make a tiny random checkpoint in a temp dir and use it")
    ap.add_argument("--concurrency", default="1,16,64,128")
    ap.add_argument("--no-batching", action="store_true", help="add one-stream-per-call baseline runs")
    ap.add_argument("--baseline-concurrency", default=None, help="baseline concurrencies (default: 1 and 64 "
                    "if listed, else the largest)")
    ap.add_argument("--llm", default="torch", choices=["torch", "vllm"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--config", default=None)
    ap.add_argument("--input-mode", default="segments", choices=["segments", "bistream"])
    ap.add_argument("--chars-per-s", type=float, default=30.0)
    ap.add_argument("--text-chars", type=int, default=400, help="characters of text per stream")
    ap.add_argument("--tokens-per-char", type=float, default=5 / 3)
    ap.add_argument("--prompt-s", type=float, default=3.0, help="seconds of the (synthetic) voice prompt")
    ap.add_argument("--ramp-s", type=float, default=1.0, help="stream starts spread over this many seconds")
    ap.add_argument("--max-run-s", type=float, default=90.0, help="bound per run; late streams are cancelled")
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--frame-budget", type=int, default=None, help="padded flow frames per call")
    ap.add_argument("--urgent-budget", type=int, default=None, help="budget of first-chunk steps (0: off)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="any engine config key (configs/engine.yaml), e.g. --set max_chunk_tokens=200")
    ap.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="LABEL=YAML",
                    help="run the whole plan once per variant, each a fresh engine with these config "
                    "overrides on top of --set, e.g. --variant base={} --variant 'cache={prefix_cache_voices: 4}'; "
                    "variants with the same LLM settings share one LLM backend (vLLM starts once)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None)
    a = ap.parse_args(argv)
    a.concurrency = [int(x) for x in str(a.concurrency).split(",") if x]
    if a.baseline_concurrency:
        a.baseline_concurrency = [int(x) for x in a.baseline_concurrency.split(",") if x]
    else:
        a.baseline_concurrency = [c for c in a.concurrency if c in (1, 64)] or [max(a.concurrency)]
    if not a.model and not a.tiny:
        ap.error("--model DIR or --tiny")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    if args.tiny:
        from engine.tools.make_checkpoint import make_checkpoint
        args.model = make_checkpoint(Path(tempfile.mkdtemp(prefix="bench-tiny-")), "tiny", seed=0)
        if args.device == "auto":
            args.device = "cpu"
    meta, runs = asyncio.run(bench(args))
    table = markdown(meta, runs)
    if args.out_json:
        write_json(args.out_json, meta, runs)
    if args.out_md:   # appended: bench/RESULTS.md keeps earlier runs and other benchmarks' sections
        with open(args.out_md, "a") as f:
            f.write("\n" + table)
    print()
    print(table)


if __name__ == "__main__":
    main()
