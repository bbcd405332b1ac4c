"""LLM-stage benchmark of the vLLM backend (speech tokens only, no flow/HiFT).

    python bench/vllm_llm_bench.py --model-dir DIR [--ras on|off|both] [--conc 1,16,64,128]

Per concurrency c: c zero-shot-shaped requests start together (prompt ≈ 1 + 60 text + 1 + 150 speech
ids), each decodes exactly --tokens speech tokens. Reports time to the 1st and 18th token (the first
audio chunk needs 15 + 3 lookahead tokens) p50/p95, tokens/s per request and in total. ``--ras``:
``on`` = logits processor installed, RAS requests (V1 model runner); ``off-proc`` = processor
installed, plain top-k requests; ``off`` = no processor (Model Runner V2), plain top-k. Decode
pacing is off: this measures the LLM alone. Prints one table and writes JSON lines to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from engine.llm.backend import LLMRequest
from engine.llm.vllm_backend.backend import VLLMBackend, VLLMOptions


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def wave(backend, c, tokens, ras, seed):
    rng = random.Random(seed)
    reqs = [LLMRequest(f"b{seed}-{i}", [rng.randrange(151000) for _ in range(40)],
                       prompt_text_ids=[rng.randrange(151000) for _ in range(20)],
                       prompt_speech_tokens=[rng.randrange(6561) for _ in range(150)],
                       min_tokens=tokens, max_tokens=tokens, seed=seed * 1000 + i, ras=ras) for i in range(c)]
    t0 = time.perf_counter()

    async def one(r):
        n, t1, t18 = 0, None, None
        async for toks in backend.generate(r):
            n += len(toks)
            now = time.perf_counter() - t0
            t1 = now if t1 is None else t1
            if t18 is None and n >= 18:
                t18 = now
        return n, t1, t18, time.perf_counter() - t0
    res = await asyncio.gather(*(one(r) for r in reqs))
    wall = time.perf_counter() - t0
    n_tot = sum(r[0] for r in res)
    return {"c": c, "ras": ras, "tokens": tokens, "wall_s": wall,
            "t1_p50_ms": 1000 * pct([r[1] for r in res], 50), "t1_p95_ms": 1000 * pct([r[1] for r in res], 95),
            "t18_p50_ms": 1000 * pct([r[2] for r in res], 50), "t18_p95_ms": 1000 * pct([r[2] for r in res], 95),
            "tok_s_per_req": statistics.median(r[0] / (r[3] - r[1]) for r in res),
            "tok_s_total": n_tot / wall, "all_complete": all(r[0] == tokens for r in res)}


async def run_mode(args, mode):
    opts = VLLMOptions(dtype=args.dtype, gpu_memory_utilization=args.mem, max_num_seqs=args.max_num_seqs,
                       max_model_len=2048, logits_processor=mode != "off", pace_tokens_per_s=None,
                       cudagraph_capture_sizes=[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256],
                       warmup_requests=16)
    backend = VLLMBackend(args.model_dir, opts)
    await backend.start()
    rows = [{"mode": mode, "startup": backend.startup}]
    print(f"[{mode}] start-up {backend.startup}", flush=True)
    for c in args.conc:
        for rep in range(2 if c == 1 else 1):
            r = await wave(backend, c, args.tokens, mode == "on", seed=c * 10 + rep)
            r["mode"] = mode
            rows.append(r)
            print(json.dumps(r), flush=True)
    await backend.close()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--modes", default="on,off")
    ap.add_argument("--conc", default="1,16,64,128")
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mem", type=float, default=0.5)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out", default="vllm_bench.jsonl")
    args = ap.parse_args()
    args.conc = [int(x) for x in args.conc.split(",")]
    rows = []
    for mode in args.modes.split(","):
        rows += asyncio.run(run_mode(args, mode))
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("\n| mode | c | 1st token p50/p95 ms | 18th token p50/p95 ms | tok/s per req | tok/s total |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "c" in r:
            print(f"| {r['mode']} | {r['c']} | {r['t1_p50_ms']:.0f}/{r['t1_p95_ms']:.0f} | "
                  f"{r['t18_p50_ms']:.0f}/{r['t18_p95_ms']:.0f} | {r['tok_s_per_req']:.0f} | {r['tok_s_total']:.0f} |")


if __name__ == "__main__":
    main()
