#!/bin/bash
# The H100 performance record (bench/RESULTS.md), one stage per device call (each < 10 min).
#   bash bench/h100_run.sh torch   # full-size random checkpoint; engine_bench with the torch LLM,
#                                  # batched c=1,16,64,128 + --no-batching baseline; ws_loadgen c=64
#   bash bench/h100_run.sh vllm    # engine_bench with the vLLM LLM (needs the vLLM bundle on PYTHONPATH);
#                                  # NO_BATCHING=64 adds the one-stream-per-call baseline at c=64;
#                                  # EXTRA="--set key=yaml ..." passes engine_bench arguments;
#                                  # VARIANTS="label={key: yaml}|label2={...}" runs the plan once per variant,
#                                  # a fresh engine each on one vLLM start (engine_bench --variant)
#   bash bench/h100_run.sh profile # bench/flow_profile.py: estimator/encoder/HiFT alone (no vLLM needed);
#                                  # PROFILE_ARGS=--compile adds the estimator under torch.compile,
#                                  # --fused the projections unfused against fused
#   bash bench/h100_run.sh probe   # bench/prefix_probe.py: an estimator step with and without the prefix cache
#   SWEEP="label:--set key=yaml ...|label2:..." bash bench/h100_run.sh sweep   # T_VARIANT: s per variant
#                                  # (default 300; vLLM start + graph capture alone took over 150 s)
#                                  # one vLLM engine_bench per variant, c=$CONC; for variants that change
#                                  # the vLLM settings (otherwise VARIANTS=... with the vllm stage is cheaper)
# Expects `pip install --no-deps -e .` done (vLLM plugin entry point). Results and logs go to $OUT;
# a background nvidia-smi sampler records whole-card memory (vLLM's engine process included).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
MODEL=${MODEL:-/tmp/cosy-full}
COMMON="--model $MODEL --device cuda --dtype bfloat16 --text-chars ${TEXT_CHARS:-300} --max-run-s ${MAX_RUN_S:-45}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/card.txt"
smi() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/smi_$1.csv" & SMI=$!; }
if [ ! -f "$MODEL/flow.pt" ]; then
  /usr/bin/time -f "make_checkpoint full: %e s" python3 -m engine.tools.make_checkpoint --size full --seed 0 --out "$MODEL" 2>&1 | tail -2
fi
case "$1" in
  torch)
    smi torch
    timeout ${T_BENCH:-400} python3 bench/engine_bench.py $COMMON --llm torch --concurrency ${CONC:-1,16,64,128} \
      --no-batching --baseline-concurrency ${BASE_CONC:-64} --out-json "$OUT/torch.json" --out-md "$OUT/torch.md" \
      > "$OUT/torch.log" 2>&1; echo "engine_bench torch rc=$?"
    kill $SMI
    if [ -n "${WS_CLIENTS:-}" ]; then
      timeout ${T_WS:-150} python3 bench/ws_loadgen.py --serve-model "$MODEL" --device cuda --tokens-per-char 1.6667 \
        --engine '{dtype: bfloat16, llm_backend: torch}' --clients "$WS_CLIENTS" --turns 1 --max-seconds 90 \
        --label "H100 full random, torch LLM" --append "$OUT/ws.md" > "$OUT/ws.log" 2>&1; echo "ws_loadgen rc=$?"
    fi
    tail -n 25 "$OUT/torch.md" 2>/dev/null; grep -E "Error|Traceback|error" "$OUT/torch.log" | head -5
    ;;
  vllm)
    VARGS=(); IFS='|' read -ra VS <<< "${VARIANTS:-}"; for v in "${VS[@]}"; do VARGS+=(--variant "$v"); done
    smi vllm
    timeout ${T_BENCH:-540} python3 bench/engine_bench.py $COMMON --llm vllm --config configs/bench-h100-vllm.yaml \
      --concurrency ${CONC:-1,16,64,128} ${NO_BATCHING:+--no-batching --baseline-concurrency $NO_BATCHING} ${EXTRA:-} "${VARGS[@]}" \
      --out-json "$OUT/vllm.json" --out-md "$OUT/vllm.md" \
      > "$OUT/vllm.log" 2>&1; echo "engine_bench vllm rc=$?"
    kill $SMI
    tail -n 25 "$OUT/vllm.md" 2>/dev/null; grep -E "Error|Traceback" "$OUT/vllm.log" | head -5
    ;;
  sweep)
    IFS='|' read -ra VARIANTS <<< "$SWEEP"
    for v in "${VARIANTS[@]}"; do
      label=${v%%:*}
      eval "timeout ${T_VARIANT:-300} python3 bench/engine_bench.py $COMMON --llm vllm --config configs/bench-h100-vllm.yaml \
        --concurrency ${CONC:-64} ${v#*:} --out-json $OUT/sweep-$label.json --out-md $OUT/sweep-$label.md" \
        > "$OUT/sweep-$label.log" 2>&1; echo "$label rc=$?"
      grep -A4 "^| c |" "$OUT/sweep-$label.md" | grep -E "^\| [0-9]" | sed "s/^/$label /"
    done
    ;;
  probe)
    python3 -m bench.prefix_probe --model "$MODEL" > "$OUT/probe.txt" 2>&1; echo "prefix_probe rc=$?"
    grep -E "^\||^store|^sdpa" "$OUT/probe.txt"
    ;;
  profile)
    python3 -m bench.flow_profile --model "$MODEL" --device cuda --dtype bfloat16 --out-md "$OUT/profile.md" ${PROFILE_ARGS:-} \
      > "$OUT/profile.log" 2>&1; echo "flow_profile rc=$?"
    grep -B2 -A40 "^## Estimator" "$OUT/profile.md" | head -60
    grep -A10 "^## Fused projections" "$OUT/profile.md"
    ;;
esac
echo "peak card memory MiB: $(sort -n "$OUT"/smi_*.csv 2>/dev/null | tail -1)"
