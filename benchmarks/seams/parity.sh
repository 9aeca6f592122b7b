#!/usr/bin/env bash
# Issue 6's "figures within noise of 67f1e1a": the same `kestrel bench offline` and `kestrel bench serve`
# commands at two checkouts, back to back (base then head for each case), on one machine.
#
#   bash benchmarks/seams/parity.sh BASE_DIR HEAD_DIR OUT_DIR [DTYPES]     (DTYPES default: "float32 bfloat16")
#
# BASE_DIR / HEAD_DIR: checkouts (e.g. `git worktree add /tmp/base 67f1e1a`); one Python environment
# with Kestrel's dependencies runs both (`python -m kestrel.cli` imports the checkout it runs in).
# Offline: SmolLM2-135M (bundled), 128 in / 128 out, greedy, batch 1 and 16, fastest of 3, --wait-idle.
# Serving: /v1/completions streaming, 128 / 128, greedy, ignore EOS, concurrency 1 (8 prompts) and 16
# (32 prompts); the client runs on the same machine.
set -euo pipefail
base=$1 head=$2 out=$3 dtypes=${4:-float32 bfloat16}
py=${PYTHON:-python}
mkdir -p "$out"
for dtype in $dtypes; do
  for b in 1 16; do
    for side in base head; do
      dir=${!side}
      (cd "$dir" && $py -m kestrel.cli bench offline --temperature 0 --num-prompts $b --max-num-seqs $b \
        --input-len 128 --output-len 128 --num-threads 2 --dtype $dtype --num-iters 3 --wait-idle \
        --output-json "$out/offline_${dtype}_b${b}_${side}.json" > "$out/offline_${dtype}_b${b}_${side}.log" 2>&1)
      echo "offline $dtype b$b $side: $(grep 'Output tokens/s' "$out/offline_${dtype}_b${b}_${side}.log")"
    done
  done
  for side in base head; do
    dir=${!side}
    port=$((8100 + RANDOM % 800))
    (cd "$dir" && exec $py -m kestrel.cli serve --port $port --dtype $dtype --disable-uvicorn-access-log) \
      > "$out/serve_${dtype}_${side}.log" 2>&1 &
    server=$!
    for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
    for c in 1 16; do
      n=$(( c == 1 ? 8 : 32 ))
      (cd "$dir" && $py -m kestrel.cli bench serve --base-url "http://127.0.0.1:$port" --num-prompts $n \
        --max-concurrency $c --random-input-len 128 --random-output-len 128 \
        --save-result "$out/serve_${dtype}_c${c}_${side}.json" > "$out/serve_${dtype}_c${c}_${side}.txt" 2>&1)
      echo "serve $dtype c$c $side: $(grep -i 'output token throughput' "$out/serve_${dtype}_c${c}_${side}.txt")"
    done
    kill $server; wait $server 2>/dev/null || true
  done
done
