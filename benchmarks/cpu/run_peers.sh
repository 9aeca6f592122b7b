#!/usr/bin/env bash
# Side by side on this CPU machine, one server at a time, same client: Kestrel (eager, --compile-decode),
# vLLM CPU and llama.cpp (../shared/peers scripts; PEERS_DIR to use another copy of them).
#   bash benchmarks/cpu/run_peers.sh OUT_DIR [engines...]
#   engines: kestrel kestrel-compiled kestrel-quant kestrel-quant-compiled (--cpu-quantized-decode)
#   kestrel-all (+ --compile-prefill) vllm llamacpp
# 128 in / 128 out, /v1/completions, greedy, ignore EOS, concurrency 1 (8 prompts), 8 (16), 16 (32);
# Each concurrency draws its own prompts (--seed C): with one seed, c8 would re-send c1's prompts and
# every engine with a prefix cache would skip their prefill. CONCURRENCY="1" for a subset;
# DTYPE=bfloat16 (default float32) for every Kestrel run and vLLM.
set -uo pipefail
out=${1:?OUT_DIR}; shift; mkdir -p "$out"
peers=${PEERS_DIR:-$(cd "$(dirname "$0")/../../../shared/peers" && pwd)}
engines=${*:-kestrel kestrel-compiled vllm llamacpp}
dtype=${DTYPE:-float32}
wait_up() { for _ in $(seq 600); do curl -sf "$1$2" >/dev/null && return 0; sleep 1; done; return 1; }
for e in $engines; do
  case $e in
    kestrel) port=8011; kestrel serve --port $port --disable-uvicorn-access-log --dtype $dtype >"$out/$e.log" 2>&1 & ;;
    kestrel-compiled) port=8012; kestrel serve --port $port --disable-uvicorn-access-log --dtype $dtype --compile-decode >"$out/$e.log" 2>&1 & ;;
    kestrel-quant) port=8013; kestrel serve --port $port --disable-uvicorn-access-log --dtype $dtype --cpu-quantized-decode >"$out/$e.log" 2>&1 & ;;
    kestrel-quant-compiled) port=8014; kestrel serve --port $port --disable-uvicorn-access-log --dtype $dtype --cpu-quantized-decode --compile-decode >"$out/$e.log" 2>&1 & ;;
    kestrel-all) port=8015; kestrel serve --port $port --disable-uvicorn-access-log --dtype $dtype --cpu-quantized-decode --compile-decode --compile-prefill >"$out/$e.log" 2>&1 & ;;
    vllm) port=8000; bash "$peers/serve-vllm.sh" $port $dtype >"$out/$e.log" 2>&1 & ;;
    llamacpp) port=8081; bash "$peers/serve-llamacpp.sh" $port >"$out/$e.log" 2>&1 & ;;
  esac
  pid=$!; url=http://127.0.0.1:$port; ready=/health; [ $e = llamacpp ] && ready=/v1/models
  t0=$(date +%s); wait_up $url $ready || { echo "$e did not start"; kill $pid; continue; }
  echo "== $e up in $(( $(date +%s) - t0 )) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
  for c in ${CONCURRENCY:-1 8 16}; do
    n=$(( c == 1 ? 8 : 2 * c ))
    echo "-- $e c$c load before $(cut -d' ' -f1 /proc/loadavg)"
    kestrel bench serve --base-url $url --endpoint /v1/completions --num-prompts $n --max-concurrency $c \
      --random-input-len 128 --random-output-len 128 --temperature 0 --ignore-eos --num-warmups 1 --seed $c \
      --save-result "$out/serve_${e}_c${c}.json" 2>&1 | grep -iE "throughput|TTFT|TPOT|completed|failed|output tokens"
    echo "-- load after $(cut -d' ' -f1 /proc/loadavg)"
  done
  kill $pid; wait $pid 2>/dev/null
done
