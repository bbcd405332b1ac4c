"""What the voice prefix cache (engine/flow/prefix.py) does to one estimator Euler step.

    python -m bench.prefix_probe --model /tmp/cosy-full --device cuda --dtype bfloat16

For rows × a sequence of T frames (random inputs, streaming masks), mean ms per step, eagerly and
through the engine's CUDA-graph buckets: computed whole; its first 100 frames read from the cache
(T − 100 computed); and whole through the prefixed path with nothing cached (a final chunk in a call
that reads the cache). Then the cached and uncached step under two SDPA backends, and the
profiler's top kernels of each. Prints Markdown-ish text; bench/RESULTS.md has the H100's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.flow_profile import add_model_args, estimator_call, estimator_kernels, timed  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--rows", default="2,16,64")
    ap.add_argument("--frames", default="160,420", help="sequence frames T (each > 100)")
    args = ap.parse_args(argv)
    from engine.engine import EngineConfig
    from engine.flow.prefix import PrefixReader, PrefixStore
    from engine.models import load_models
    from engine.streaming.cuda_graphs import GraphedEstimator
    m = load_models(args.model, args.device, args.dtype, load_llm=False)
    dev = m.device
    eager = m.flow.decoder.estimator
    edt = m.flow.decoder.estimator_dtype
    cfg = EngineConfig()
    C = 100
    store = PrefixStore(eager, 1, C, steps=10)
    graphed = GraphedEstimator(eager, cfg.graph_rows, cfg.graph_frames, cfg.graph_max_elements, dev.type == "cuda")
    graphed.prefix_store = store

    def call(module, R, T, cached):
        if cached is None:
            return estimator_call(module, R, T, dev, edt)
        rows = torch.arange(R, device=dev) % 2          # the store's first slot, step 0, both CFG rows
        frames = torch.full((R,), cached, dtype=torch.long, device=dev)
        return estimator_call(module, R, T, dev, edt, lambda: PrefixReader(store, rows, frames))

    print(f"store keys per row: {store.keys}")
    print("| rows | frames (sequence) | eager full | eager prefixed (T-100 + 100 cached) | eager prefixed, 0 cached (T) "
          "| graph full | graph prefixed | graph prefixed, 0 cached |", flush=True)
    with torch.inference_mode():
        for R in (int(r) for r in args.rows.split(",")):
            for T in (int(f) for f in args.frames.split(",")):
                cells = [timed(call(eager, R, T, None), args.iters, dev),
                         timed(call(eager, R, T - C, C), args.iters, dev),
                         timed(call(eager, R, T, 0), args.iters, dev),
                         timed(call(graphed, R, T, None), args.iters, dev),
                         timed(call(graphed, R, T - C, C), args.iters, dev),
                         timed(call(graphed, R, T, 0), args.iters, dev)]
                print(f"| {R} | {T} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
        if dev.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            for name, backend in [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
                for cached in (None, C):
                    try:
                        with sdpa_kernel([backend]):
                            ms = timed(call(eager, 16, 260 - (cached or 0), cached), args.iters, dev)
                        print(f"sdpa {name} cached={cached}: {ms:.2f} ms", flush=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"sdpa {name} cached={cached}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            for cached in (None, C):
                print("\n".join(estimator_kernels(call(eager, 16, 260 - (cached or 0), cached),
                                                   f"eager 16 rows, cached={cached}")), flush=True)


if __name__ == "__main__":
    main()
