#!/usr/bin/env bash
# Issue 7's GPU script: on a bare CUDA machine with no network, install the wheels carried in .whl,
# check correctness, time the kernels and every workload, and print one table last.
#
#   bash benchmarks/gpu/run.sh [STAGE ...]   STAGE: check|quick|bench|structured|profile|serve|bench+serve|all (default: all)
#   or cold (first: start-up on a cold Triton cache, then the workloads in ONLY) / sweep (attention launch settings) / prefix (issue 9's two harnesses side by side), never part of all.
#   check: tests, correctness, kernels; quick: check + batch-1 and batch-64 latency; bench: every workload,
#   issue 9's prefix-cache workloads and the HF peer. Several stages run in one call (one machine start):
#   `run.sh check bench`. SKIP="pytest hf_peer" leaves steps out; DEADLINE_S=580 (default: none) shortens
#   each step's limit so the whole call ends inside that many seconds. JSON under $OUT, logs in $OUT/logs.tgz.
#
# .whl (`bash benchmarks/gpu/make_wheels.sh` fills it) holds: xgrammar 0.2.8 + apache-tvm-ffi (structured outputs; not yet run there), msgspec, gguf, pyzmq, fastapi + starlette + pydantic 2.12.5 + pydantic-core 2.41.5,
# uvicorn, typing-inspection, annotated-types/doc, opentelemetry-api (fastapi needs it), and
# .whl/smol-tokenizer (the bundled SmolLM2 tokenizer as tokenizer.json, for serving the dummy model).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kestrel-gpu}
LOGS=${LOGS:-/tmp/kestrel-gpu-logs}  # full logs of each step (only 8 files come back from a lent machine)
mkdir -p "$OUT" "$LOGS"
stages=" ${*:-all} "
stages=${stages//bench+serve/bench serve}
has() {  # has STAGE...: any of them asked for (or all)
  local s
  for s in "$@" all; do [[ $stages == *" $s "* ]] && return 0; done
  return 1
}
DEADLINE_S=${DEADLINE_S:-0}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# step NAME SECONDS CMD...: run with a time limit (SIGABRT: Python prints where it hung), log to $OUT/NAME.log
step() {
  local name=$1 secs=$2; shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "---- $name skipped"; return 0; fi
  if (( DEADLINE_S > 0 )); then
    local left=$((DEADLINE_S - SECONDS - 5))
    (( left < 20 )) && { echo "---- $name not run: ${left}s left of DEADLINE_S"; return 125; }
    (( secs > left )) && secs=$left
  fi
  echo "---- $name (limit ${secs}s, at ${SECONDS}s)"
  timeout -k 10 -s ABRT "$secs" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -v -e "^INFO" -e Warning "$LOGS/$name.log" | tail -${TAIL:-25}
  echo "---- $name rc=$rc"
  return $rc
}
MODEL=benchmarks/gpu/llama-3.1-8b
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

eager=()
if [[ $stages == *" cold "* ]]; then  # start-up on a cold Triton cache: first thing on a fresh machine
  TAIL=10 step cold 300 python3 benchmarks/gpu/workloads.py --model "$MODEL" --out "$OUT/cold.json" \
    --only ${ONLY:-b1_128x512}
fi
if has check quick; then
  step correctness 120 python3 benchmarks/gpu/correctness.py --out "$OUT/correctness.json"; rc=$?
  [[ $rc == 124 || $rc == 134 ]] && eager=(--enforce-eager)  # hung: time the rest without CUDA graphs
fi
if [[ $stages == *" quick "* ]]; then
  step workloads 170 python3 benchmarks/gpu/workloads.py --model "$MODEL" --out "$OUT/workloads.json" \
    --only b1_128x512 b64_128x512 "${eager[@]}"
fi
if has check quick; then
  TAIL=40 step kernels 90 python3 benchmarks/gpu/kernels_check.py --out "$OUT/kernels.json"
  step pytest 150 python3 -m pytest -q -x -p no:cacheprovider --timeout 60 tests/test_triton_backend.py tests/test_structured_units.py \
    tests/test_sampler.py tests/test_worker.py tests/test_triton_kernels.py
fi

if has bench; then
  TAIL=30 step workloads 450 python3 benchmarks/gpu/workloads.py --model "$MODEL" --out "$OUT/workloads.json" \
    --prefix-cache-workloads "${eager[@]}"
  step hf_peer 90 python3 benchmarks/gpu/hf_peer.py --model "$MODEL" --out "$OUT/hf.json"
fi

if [[ $stages == *" sweep "* ]]; then  # launch settings of the attention kernels (kestrel/kernels/tuning.py)
  TAIL=30 step attn_sweep 240 python3 benchmarks/gpu/attn_sweep.py --out "$OUT/attn_sweep.json"
fi

if [[ $stages == *" prefix "* ]]; then  # issue 9: both harnesses back to back (fresh process vs one engine)
  sp=(python3 -m kestrel.cli bench offline $MODEL --load-format dummy --dtype bfloat16 --max-model-len 4096
      --max-num-seqs 256 --max-num-batched-tokens 8192 --temperature 0)
  TAIL=8 step sp_on 120 "${sp[@]}" --dataset shared-prefix --num-groups 32 --prompts-per-group 16 --prefix-len 2048 \
    --input-len 128 --output-len 128 --output-json "$OUT/sp_on.json"
  TAIL=8 step mt_on 90 "${sp[@]}" --dataset multi-turn --num-prompts 1 --num-turns 10 --input-len 100 \
    --output-len 32 --output-json "$OUT/mt.json"
  TAIL=12 step prefix_workloads 200 python3 benchmarks/gpu/workloads.py --model "$MODEL" --only none \
    --prefix-cache-workloads --out "$OUT/prefix_workloads.json"
fi

if has structured; then  # issue 10: JSON schema vs free text, batch 1 and 16, jump-forward on (SmolLM2's tokenizer)
  served=/tmp/llama-3.1-8b-dummy
  mkdir -p $served && cp $MODEL/config.json .whl/smol-tokenizer/* $served/
  for b in 1 16; do
    common=(python3 -m kestrel.cli bench offline $served --load-format dummy --dtype bfloat16 --max-model-len 4096
            --temperature 0 --input-len 64 --num-warmup-tokens 8 --num-prompts $b --max-num-seqs $b)
    TAIL=4 step structured_json_b$b 90 "${common[@]}" --output-len 128 \
      --json-schema benchmarks/structured/users.schema.json --output-json "$LOGS/structured_json_b$b.json"
    TAIL=4 step structured_free_b$b 90 "${common[@]}" --output-len 112 --output-json "$LOGS/structured_free_b$b.json"
  done
  python3 - "$LOGS" "$OUT/structured.json" <<'PY'
import glob, json, os, sys
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "structured_*.json")))}
json.dump(runs, open(sys.argv[2], "w"), indent=1)
for name, r in runs.items():
    print(f"{name:<22} {r['ms_per_output_token']:.3f} ms/token, {r['num_output_tokens']} tokens, "
          f"{r.get('num_steps')} steps, jump-forward {r.get('jump_forward_share', 0):.1%}")
PY
fi

if has profile; then
  TAIL=80 step profile 200 python3 benchmarks/gpu/gpu_profile.py --model "$MODEL"
fi

if has serve; then
  served=/tmp/llama-3.1-8b-dummy
  mkdir -p $served && cp $MODEL/config.json .whl/smol-tokenizer/* $served/
  python3 -m kestrel.cli serve $served --load-format dummy --port 8011 --max-model-len 4096 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --disable-uvicorn-access-log > "$LOGS/serve.log" 2>&1 &
  server=$!
  python3 - $server <<'PY'
import os, sys, time, urllib.request
for _ in range(240):
    try:
        os.kill(int(sys.argv[1]), 0)  # the server died: stop waiting
    except OSError:
        break
    try:
        if urllib.request.urlopen("http://127.0.0.1:8011/health", timeout=2).status == 200:
            break
    except OSError:
        pass
    time.sleep(1)
PY
  TAIL=30 step bench_serve 120 python3 -m kestrel.cli bench serve --base-url http://127.0.0.1:8011 --num-prompts 256 \
    --max-concurrency 64 --random-input-len 128 --random-output-len 512 --tokenizer $served \
    --save-result "$OUT/serve.json"
  kill $server; wait $server 2>/dev/null
  grep -v "^INFO" "$LOGS/serve.log" | tail -8
fi

tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else {}
w, hf, c, s = load("workloads.json"), load("hf.json"), load("correctness.json"), load("serve.json")
print("=" * 72)
print(f"{'figure':<44}{'Kestrel':>12}{'goal':>14}")
goals = {"startup_to_first_token_s": "<= 15 s", "b1_128x512": "<= 4.0 ms", "b64_128x512": ">= 10,900",
         "n2000_256x256": ">= 16,300", "n500_1024x1024": ">= 9,950", "n200_2048x16": ">= 45,000"}
for key, goal in goals.items():
    v = w.get(key)
    v = v["value"] if isinstance(v, dict) else v
    print(f"{key:<44}{'-' if v is None else f'{v:,.2f}':>12}{goal:>14}")
if s:
    v = s.get("output_throughput") or s.get("metrics", {}).get("output_throughput")
    print(f"{'serve c64 128x512 output tok/s':<44}{v if v is None else f'{v:,.1f}':>12}{'>= 90% offline':>14}")
if hf:
    print(f"{'HF transformers b1 ms/token (sanity peer)':<44}{hf['hf_b1_128x128_ms_per_token']:>12.2f}")
for key in ("shared_prefix_cache_on", "shared_prefix_cache_off"):
    v = w.get(key, {})
    print(f"{key + ' output tok/s':<44}{v.get('output_tok_s', v.get('error', '-'))!s:>12}")
if w.get("multi_turn_ttft_by_turn_ms"):
    print(f"{'10-turn chat TTFT by turn (ms)':<44}{' '.join(f'{t:.0f}' for t in w['multi_turn_ttft_by_turn_ms'])}")
if s and w.get("b64_128x512"):
    v = s.get("output_throughput") or s.get("metrics", {}).get("output_throughput")
    print(f"{'serve / offline b64 output tok/s':<44}{v / w['b64_128x512']['output_tok_s']:>12.3f}")
for k, v in c.items():
    print(f"{'correctness ' + k:<44}{str(v):>12}")
PY
