"""bench/schedule_model.py: the real scheduler on a virtual clock answers to the modelled call cost."""
from bench.schedule_model import CallCost, simulate
from engine.engine import EngineConfig


def test_schedule_model_runs_engine_bench_workload_and_answers_to_the_cost():
    cfg = EngineConfig.load(None)
    fast = simulate(cfg, 3, CallCost(cfg.graph_rows, cfg.graph_frames, gpu_share=0.5), text_chars=120)
    slow = simulate(cfg, 3, CallCost(cfg.graph_rows, cfg.graph_frames, gpu_share=20.0), text_chars=120)
    assert fast["underruns"] == 0 and slow["underruns"] > 0
    # first audio = LLM's 18 tokens (40 ms + 17/300 s) + one first-chunk call; 20x the cost shows
    assert 0.09 < fast["ttfa_p50_ms"] / 1e3 < 0.2 < slow["ttfa_p50_ms"] / 1e3
    assert fast["flow_frames_per_new_frame"] > 1.0
    assert CallCost([2, 4], [256, 512]).padded(3, 300) == (4, 512)
    assert CallCost([2, 4], [256, 512]).padded(6, 300) == (6, 300)       # beyond the row buckets: own shape,
    assert CallCost([2, 4], [256, 512]).padded(3, 600) == (3, 600)       # as GraphedEstimator.padded_shape
