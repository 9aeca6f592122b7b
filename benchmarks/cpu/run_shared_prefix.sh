#!/usr/bin/env bash
# Issue 9's CPU workload side by side, one server at a time, same client: shared prefix G=4 R=8 P=512
# Q=32 O=32, concurrency 8, /v1/completions, greedy, EOS ignored; Kestrel and vLLM CPU, cache on and off.
#   bash benchmarks/cpu/run_shared_prefix.sh OUT_DIR [engines...]
#   engines: kestrel kestrel-nocache vllm vllm-nocache (default: all four), kestrel-compiled (cache on,
#   --compile-decode); DTYPE=bfloat16 (default float32) for every engine; KESTREL_ARGS adds Kestrel flags.
set -uo pipefail
out=${1:?OUT_DIR}; shift; mkdir -p "$out"
peers=${PEERS_DIR:-$(cd "$(dirname "$0")/../../../shared/peers" && pwd)}
engines=${*:-kestrel kestrel-nocache vllm vllm-nocache}
dtype=${DTYPE:-float32}
kargs=(--disable-uvicorn-access-log --dtype $dtype ${KESTREL_ARGS:-})
wait_up() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
for e in $engines; do
  case $e in
    kestrel) port=8031; kestrel serve --port $port "${kargs[@]}" >"$out/$e.log" 2>&1 & ;;
    kestrel-compiled) port=8033; kestrel serve --port $port "${kargs[@]}" --compile-decode >"$out/$e.log" 2>&1 & ;;
    kestrel-nocache) port=8032; kestrel serve --port $port "${kargs[@]}" --disable-radix-cache >"$out/$e.log" 2>&1 & ;;
    vllm) port=8000; bash "$peers/serve-vllm.sh" $port $dtype >"$out/$e.log" 2>&1 & ;;
    vllm-nocache) port=8001; bash "$peers/serve-vllm.sh" $port $dtype --no-enable-prefix-caching >"$out/$e.log" 2>&1 & ;;
  esac
  pid=$!; url=http://127.0.0.1:$port
  t0=$(date +%s); wait_up $url || { echo "$e did not start"; kill $pid; continue; }
  echo "== $e up in $(( $(date +%s) - t0 )) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
  kestrel bench serve --base-url $url --endpoint /v1/completions --dataset shared-prefix --num-groups 4 \
    --prompts-per-group 8 --prefix-len 512 --random-input-len 32 --random-output-len 32 --max-concurrency 8 \
    --temperature 0 --ignore-eos --num-warmups 1 --save-result "$out/shared_prefix_${e}.json" 2>&1 \
    | grep -iE "duration|throughput|TTFT|completed|failed|cached"
  echo "-- load after $(cut -d' ' -f1 /proc/loadavg)"
  kill $pid; wait $pid 2>/dev/null
done
