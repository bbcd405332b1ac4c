#!/bin/bash
# vLLM backend checks on the GPU host (docs/VLLM.md, "Running on the H100").
#   bash bench/gpu_vllm_check.sh tests   # GPU tests (tiny + full-size random checkpoints)
#   bash bench/gpu_vllm_check.sh bench   # LLM-stage throughput, RAS on vs off
# Expects vLLM importable (PYTHONPATH=/tmp/site from the bundle) and the package installed with
# `pip install --no-deps -e .` so the vllm.general_plugins entry point exists. Logs go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export COSY_GPU_TINY_DIR=${COSY_GPU_TINY_DIR:-/tmp/cosy-tiny} COSY_GPU_FULL_DIR=${COSY_GPU_FULL_DIR:-/tmp/cosy-full}
mk() {  # LLM-only random checkpoint (llm.pt + config.json)
  [ -f "$2/llm.pt" ] || python3 -c "import sys; from pathlib import Path; from tests.gpu.conftest import make_llm_dir; make_llm_dir(Path(sys.argv[2]), sys.argv[1], 3)" "$1" "$2"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
case "$1" in
  tests)
    mk tiny "$COSY_GPU_TINY_DIR"; mk full "$COSY_GPU_FULL_DIR"
    python3 -m pytest ${TESTS:-tests/gpu} -v -s -rA -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|ERROR|start-up|tokens|RAS:|cancelled|bistream|passed|failed|Error" | head -80
    ;;
  bench)
    mk full "$COSY_GPU_FULL_DIR"
    python3 bench/vllm_llm_bench.py --model-dir "$COSY_GPU_FULL_DIR" --modes "${MODES:-on,off}" --conc "${LLM_CONC:-1,16,64,128}" --out "$OUT/vllm_bench.jsonl" 2>&1 | tee "$OUT/bench.log" | grep -vE "^(INFO|DEBUG|WARNING)" | tail -40
    ;;
esac
