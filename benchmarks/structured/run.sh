#!/usr/bin/env bash
# Constrained (JSON schema, jump-forward on / off) vs unconstrained decoding, offline, batch 1 and 16.
# Free text runs 112 tokens per request (ignore_eos), about what the schema's answers take, so the
# prefill is shared over as many tokens; constrained answers end at EOS (128 is a cap).
# Run from the repository root (so `python -m` imports this checkout): bash benchmarks/structured/run.sh
set -euo pipefail
out=benchmarks/structured
pass=${1:-1}  # run it twice (1, 2) and take the faster of each; the machine is shared
common=(--temperature 0 --input-len 64 --num-threads 1 --dtype float32 --num-warmup-tokens 8)
for b in 1 16; do
  python -m kestrel.cli bench offline "${common[@]}" --num-prompts "$b" --max-num-seqs "$b" --output-len 112 \
    --output-json "$out/offline_free_b${b}_p${pass}.json"
  [[ ${FREE_ONLY:-0} == 1 ]] && continue
  python -m kestrel.cli bench offline "${common[@]}" --num-prompts "$b" --max-num-seqs "$b" --output-len 128 \
    --json-schema "$out/users.schema.json" --output-json "$out/offline_json_jf_b${b}_p${pass}.json"
  python -m kestrel.cli bench offline "${common[@]}" --num-prompts "$b" --max-num-seqs "$b" --output-len 128 \
    --json-schema "$out/users.schema.json" --no-jump-forward --output-json "$out/offline_json_nojf_b${b}_p${pass}.json"
done
