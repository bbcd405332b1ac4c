"""Where a token2wav step's time goes: the flow encoder, the estimator (CUDA graphs vs eager), HiFT.

    python -m bench.flow_profile --model /tmp/cosy-full --device cuda --dtype bfloat16 --out-md prof.md

Times each stage alone on random inputs of the given model (CUDA events around ``--iters`` calls
after warm-up), then one whole first-chunk step (prompt + 18 tokens, one stream) phase by phase,
and prints the torch.profiler table of that step (top ops by self device time). Writes Markdown.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def timed(fn, iters: int, device: torch.device) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` calls (after 2 warm-up calls), device-synchronised."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1000 / iters


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model (a checkpoint directory), --device, --dtype and --iters (timed calls per shape)."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=10)


def estimator_call(module, rows: int, frames: int, device, dtype, prefix=None):
    """A call of ``module`` (a flow estimator) on fixed random inputs [rows, 80, frames] of ``dtype``,
    every row streaming; ``prefix``: None, or a function that gives the call's prefix reader (built
    inside the call, as the engine builds one per Euler step)."""
    x = torch.randn(rows, 80, frames, device=device, dtype=dtype)
    mask = torch.ones(rows, 1, frames, device=device, dtype=dtype)
    t = torch.rand(rows, device=device)
    spks = torch.randn(rows, 80, device=device, dtype=dtype)
    stream = torch.ones(rows, dtype=torch.bool, device=device)
    if prefix is None:
        return lambda: module(x, mask, x, t, spks, x, stream)
    return lambda: module(x, mask, x, t, spks, x, stream, prefix())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--rows", default="2,8,32,64,128")
    ap.add_argument("--frames", default="256,512,1024")
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--compile", action="store_true", help="also time the estimator under torch.compile "
                    "(dynamic shapes) inside the CUDA-graph buckets")
    ap.add_argument("--fused", action="store_true", help="also time the buckets with the projections unfused "
                    "against fused (CausalConditionalDecoder.fuse_projections, the default)")
    args = ap.parse_args(argv)
    from engine.models import load_models
    models = load_models(args.model, args.device, args.dtype, load_llm=False)  # outside inference mode:
    with torch.inference_mode():                                               # HiFT folds weight norm
        text = profile(args, models)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")


def profile(args, m) -> str:
    """The Markdown report (see the module docstring)."""
    from engine.engine import EngineConfig
    from engine.flow.prefix import PrefixRows, PrefixStore
    from engine.scheduler import CallItem, FlowPrompt
    from engine.streaming.cuda_graphs import GraphedHiFT, install_graphed_encoder, install_graphed_estimator
    from engine.streaming.policy import ChunkPlan
    from engine.streaming.runner import BatchedToken2Wav
    from engine.token2wav import VocodeItem, vocode_batch

    dev, flow, hift = m.device, m.flow, m.hift
    est_eager = flow.decoder.estimator
    edt = flow.decoder.estimator_dtype
    cfg = EngineConfig()
    use_graphs = dev.type == "cuda"
    est = install_graphed_estimator(flow, cfg.graph_rows, cfg.graph_frames, cfg.graph_max_elements, use_graphs)
    lines = [f"# token2wav profile: {torch.cuda.get_device_name(dev) if use_graphs else 'CPU'}, "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, estimator {edt}, model {args.model}", ""]

    def call(module, R, T):
        return estimator_call(module, R, T, dev, edt)

    lines += ["## Estimator, one Euler step (rows = 2 per stream)", "",
              f"| rows | frames | bucketed ms (CUDA graph up to {cfg.graph_max_elements} rows x frames) | eager ms | frame-evals/s (bucketed) |", "|---|---|---|---|---|"]
    for R in [int(r) for r in args.rows.split(",")]:
        for T in [int(f) for f in args.frames.split(",")]:
            g_ms = timed(call(est, R, T), args.iters, dev)
            e_ms = timed(call(est_eager, R, T), max(2, args.iters // 3), dev)
            lines.append(f"| {R} | {T} | {g_ms:.2f} | {e_ms:.2f} | {R * T / g_ms * 1000:,.0f} |")
        print("\n".join(lines[-len(args.frames.split(",")):]), flush=True)

    if args.compile:
        lines += compiled_estimator(est_eager, est, call, cfg, args.iters, dev, use_graphs)
    if args.fused:
        lines += fused_projections(est_eager, call, cfg, args.iters, dev, use_graphs)
    if dev.type == "cuda":
        lines += estimator_kernels(call(est_eager, 32, 256), "Estimator kernels, eager, 32 rows x 256 frames")

    def flow_inputs(B, prompt_tokens, tokens):
        return ([torch.randint(0, 6561, (tokens,)) for _ in range(B)],
                [torch.randint(0, 6561, (prompt_tokens,)) for _ in range(B)],
                [torch.randn(2 * prompt_tokens, 80) for _ in range(B)],
                torch.randn(B, 192, device=dev), [True] * B, [False] * B)

    enc_eager = flow.encoder
    enc_rows = cfg.encoder_graph_rows or [1, 2, 4, 8]
    enc_graphed = install_graphed_encoder(flow, enc_rows, cfg.encoder_graph_tokens, use_graphs)
    store = est.prefix_store = PrefixStore(est, 1, cfg.prefix_cache_frames, steps=10)
    flow.record_prefix(store, 0, *[x[0] for x in flow_inputs(1, 75, 0)[1:3]], torch.randn(192, device=dev), 100)
    lines += ["", "## Flow encoder and whole flow call (prompt 75 tokens)", "",
              f"| streams | tokens | encode ms, eager | encode ms (CUDA graph up to {max(enc_rows)} "
              f"x {max(cfg.encoder_graph_tokens)} tokens) | flow call ms | flow call ms, 100 frames "
              "from the prefix cache |", "|---|---|---|---|---|---|"]
    for B, n in [(1, 18), (1, 100), (4, 100), (16, 100), (64, 100), (64, 300)]:
        inp = flow_inputs(B, 75, n)
        flow.encoder = enc_eager
        enc = timed(lambda: flow.encode_batch(*inp), args.iters, dev)
        flow.encoder = enc_graphed
        enc_g = timed(lambda: flow.encode_batch(*inp), args.iters, dev)
        call = timed(lambda: flow.inference_batch(*inp), max(2, args.iters // 3), dev)
        cached = timed(lambda: flow.inference_batch(*inp, prefix=PrefixRows(store, [0] * B, [100] * B)),
                       max(2, args.iters // 3), dev)
        lines.append(f"| {B} | {n} | {enc:.2f} | {enc_g:.2f} | {call:.2f} | {cached:.2f} |")
        print(lines[-1], flush=True)

    hift_rows = cfg.hift_graph_rows or [1, 2, 4, 8]
    hift_graphed = GraphedHiFT(hift, hift_rows, cfg.hift_graph_frames, use_graphs)
    lines += ["", "## HiFT, one batched vocode call (first chunks: no cache)", "",
              f"| streams | new frames | ms, eager | ms (CUDA graph up to {max(hift_rows)} x "
              f"{max(cfg.hift_graph_frames)} frames) | audio s per call |", "|---|---|---|---|---|"]
    gen = torch.Generator(device=dev).manual_seed(0)
    for B, frames in [(1, 30), (1, 100), (4, 100), (16, 100), (64, 100), (64, 200)]:
        def vocode(module):
            items = [VocodeItem(torch.randn(80, frames, device=dev), None, False, gen) for _ in range(B)]
            return lambda: vocode_batch(module, items)
        ms, ms_g = timed(vocode(hift), args.iters, dev), timed(vocode(hift_graphed), args.iters, dev)
        lines.append(f"| {B} | {frames} | {ms:.2f} | {ms_g:.2f} | {B * frames / 50:.1f} |")
        print(lines[-1], flush=True)

    # One whole first-chunk step of one stream, phase by phase, then the profiler's view.
    prompt = FlowPrompt(torch.randint(0, 6561, (75,)), torch.randn(150, 80), torch.randn(192))
    item = lambda: CallItem(prompt, torch.randint(0, 6561, (18,)), ChunkPlan(18, 0, False), None, gen)  # noqa: E731
    flow.encoder = enc_graphed
    graphed_ms = timed(lambda: BatchedToken2Wav(flow, hift_graphed, dev).run([item()]), args.iters, dev)
    flow.encoder = enc_eager
    runner = BatchedToken2Wav(flow, hift, dev)
    step_ms = timed(lambda: runner.run([item()]), args.iters, dev)
    lines += ["", f"## One stream's first chunk (75 prompt + 18 tokens): {step_ms:.1f} ms per step "
              f"({graphed_ms:.1f} ms with encoder and HiFT graphs too)", ""]
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                runner.run([item()])
            torch.cuda.synchronize()
        for key in ("self_cuda_time_total", "cpu_time_total"):
            lines += [f"top ops by {key} (3 steps):", "```",
                      prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=50), "```"]
    return "\n".join(lines)


def estimator_kernels(call, title: str, steps: int = 3) -> list[str]:
    """Markdown: ``title`` and torch.profiler's top CUDA kernels of ``steps`` calls of ``call`` (one
    warm-up call first)."""
    from torch.profiler import ProfilerActivity, profile
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    return ["", f"## {title} ({steps} calls)", "", "```",
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70),
            "```"]


def compiled_estimator(est_eager, est_graphed, estimator_call, cfg, iters: int, dev, use_graphs: bool) -> list[str]:
    """Markdown rows: one Euler step through the engine's CUDA-graph buckets, plain, and through the
    buckets captured from ``torch.compile(estimator, dynamic=True)``, with the compiled output's
    largest difference from the plain one. (H100, 2026-12-07: 0.66-1.13x, so the engine does not compile.)"""
    from engine.streaming.cuda_graphs import GraphedEstimator
    compiled = GraphedEstimator(torch.compile(est_eager, dynamic=True), cfg.graph_rows, cfg.graph_frames,
                                cfg.graph_max_elements, use_graphs)
    t0 = time.perf_counter()
    estimator_call(compiled, 8, 256)()
    compile_s = time.perf_counter() - t0
    lines = ab_header(f"Estimator under torch.compile, in the CUDA-graph buckets (first compile and capture "
                      f"{compile_s:.0f} s)", "graph ms", "compiled graph ms")
    for R, T in AB_SHAPES + [(32, 1024)]:
        torch.manual_seed(0)
        call_p = estimator_call(est_graphed, R, T)
        torch.manual_seed(0)
        call_c = estimator_call(compiled, R, T)              # the same inputs
        lines.append(ab_row(R, T, timed(call_p, iters, dev), timed(call_c, iters, dev), call_p(), call_c()))
        print(lines[-1], flush=True)
    return lines


def fused_projections(est_eager, estimator_call, cfg, iters: int, dev, use_graphs: bool) -> list[str]:
    """Markdown rows: one Euler step through fresh CUDA-graph buckets with the projections as
    ``load_models`` sets them up (``fuse_projections``: q/k/v in one GEMM per attention layer, all
    resnet time terms in one) and unfused (three GEMMs per layer, a Mish and a GEMM per resnet)."""
    from engine.streaming.cuda_graphs import GraphedEstimator
    ms = {}
    for on in (False, True):      # one state at a time: the fused weights live in the shared estimator
        est_eager.fuse_projections(on)
        graphed = GraphedEstimator(est_eager, cfg.graph_rows, cfg.graph_frames, cfg.graph_max_elements, use_graphs)
        for R, T in AB_SHAPES:
            torch.manual_seed(0)
            call = estimator_call(graphed, R, T)
            ms[on, R, T] = timed(call, iters, dev), call()
    lines = ab_header("Fused projections: q/k/v and resnet time terms unfused or fused (CUDA-graph buckets)",
                      "unfused ms", "fused ms")
    for R, T in AB_SHAPES:
        (a_ms, out_a), (b_ms, out_b) = ms[False, R, T], ms[True, R, T]
        lines.append(ab_row(R, T, a_ms, b_ms, out_a, out_b))
    return lines


# (rows, frames) of one Euler step that the A/B tables time: one stream to 64, short and long calls.
AB_SHAPES = [(2, 96), (2, 420), (16, 160), (16, 420), (64, 160), (64, 420), (128, 256)]


def ab_header(title: str, a: str, b: str) -> list[str]:
    return ["", f"## {title}", "", f"| rows | frames | {a} | {b} | speed-up | max abs diff |", "|---|---|---|---|---|---|"]


def ab_row(R: int, T: int, a_ms: float, b_ms: float, out_a: torch.Tensor, out_b: torch.Tensor) -> str:
    """One table row: both times, A's time over B's, and the outputs' largest difference."""
    diff = (out_a.float() - out_b.float()).abs().max().item()
    return f"| {R} | {T} | {a_ms:.2f} | {b_ms:.2f} | {a_ms / b_ms:.2f}x | {diff:.2e} |"


if __name__ == "__main__":
    main()
