"""Sweep the attention kernels' launch settings at the shapes of issue 7's workloads (Llama-3.1-8B, bf16).

    python benchmarks/gpu/attn_sweep.py --out attn_sweep.json        # on a GPU (~3 min)
    python benchmarks/gpu/attn_sweep.py --tiny                        # tiny shapes, CPU interpreter: no timing value

For each shape it times every candidate `AttentionTuning` (block_n x warps x stages, and
block_m for extend; KV splits for decode) with `triton.testing.do_bench` (median), checks
each candidate's output against the default settings' output (relative error < 2e-2, so a
wrong candidate is never picked), and prints the best per shape beside the default one.
The defaults live in `kestrel/kernels/tuning.py`; this script is how they were chosen.
Decode reports GB/s over the KV bytes; extend TFLOP/s over the causal FLOPs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_check as kc  # noqa: E402  (sets TRITON_INTERPRET on a CPU before the kernels import)

from kestrel.kernels.decode_attention import decode_attention  # noqa: E402
from kestrel.kernels.extend_attention import extend_attention  # noqa: E402
from kestrel.kernels.tuning import AttentionTuning, decode_tuning, extend_tuning  # noqa: E402


def candidates(block_ms: list[int], tiny: bool) -> list[AttentionTuning]:
    if tiny:
        return [AttentionTuning(block_n=n, num_warps=4, num_stages=1, block_m=m) for n in (16, 32) for m in block_ms]
    return [AttentionTuning(block_n=n, num_warps=w, num_stages=s, block_m=m)
            for m, n, w, s in itertools.product(block_ms, (32, 64, 128), (4, 8), (1, 2, 3))]


def sweep_decode(b: kc.Bench, m: kc.Model, batch: int, seq_len: int, splits: list[int]) -> list[dict]:
    q, k_cache, v_cache, req_to_token, req_rows, seq_lens, seq_lens_t = b.decode_case(m, batch, seq_len)
    workspace = b.workspace(m, batch, max(splits))
    scale = m.head_dim ** -0.5
    kv_bytes = 2 * sum(seq_lens) * m.num_kv_heads * m.head_dim * k_cache.element_size()
    ref = torch.empty_like(q)
    decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, ref, scale, splits[-1], workspace)
    rows = []
    for s, t in itertools.product(splits, candidates([0], b.tiny)):
        out = torch.empty_like(q)

        def run(s=s, t=t, out=out):
            decode_attention(q, k_cache, v_cache, req_to_token, req_rows, seq_lens_t, out, scale, s, workspace, t)

        rows.append(_time(b, run, out, ref, {"kernel": "decode", "batch": batch, "seq_len": seq_len, "splits": s,
                                             **_asdict(t)}, kv_bytes, None))
    return rows


def sweep_extend(b: kc.Bench, m: kc.Model, cases: list[tuple[int, int]], label: str) -> list[dict]:
    q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens, seq_lens_t, flops = b.extend_case(m, cases)
    q_lens = [q_len for _, q_len in cases]
    scale = m.head_dim ** -0.5
    ref = torch.empty_like(q)
    extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens_t, ref, scale, max(q_lens))
    rows = []
    for t in candidates([64, 128] if not b.tiny else [16, 32], b.tiny):
        out = torch.empty_like(q)

        def run(t=t, out=out):
            extend_attention(q, k_cache, v_cache, req_to_token, req_rows, q_start_loc, seq_lens_t, out, scale,
                             max(q_lens), t)

        rows.append(_time(b, run, out, ref, {"kernel": "extend", "case": label, **_asdict(t)}, None, flops))
    return rows


def _asdict(t: AttentionTuning) -> dict:
    return {"block_n": t.block_n, "num_warps": t.num_warps, "num_stages": t.num_stages, "block_m": t.block_m}


def _time(b: kc.Bench, run, out, ref, row: dict, num_bytes: float | None, flops: float | None) -> dict:
    try:
        run()
        err = kc.refs.rel_err(out, ref)
        us = b.time_us(run)
    except Exception as e:  # e.g. out of shared memory for this block size
        return {**row, "error": f"{type(e).__name__}: {str(e)[:120]}"}
    row.update(rel_err=err, ok=err < 2e-2, median_us=us)
    if num_bytes is not None:
        row["gb_per_s"] = num_bytes / us / 1e3
    if flops is not None:
        row["tflop_per_s"] = flops / us / 1e6
    return row


def _is_default(row: dict, dtype: torch.dtype, head_dim: int) -> bool:
    d = decode_tuning(dtype, head_dim, row["batch"]) if row["kernel"] == "decode" else extend_tuning(dtype, head_dim)
    return _asdict(d) == {k: row[k] for k in ("block_n", "num_warps", "num_stages", "block_m")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA device: only --tiny runs on CPU (under the Triton interpreter)")
    torch.manual_seed(0)
    b = kc.Bench(device, torch.bfloat16, args.tiny)
    m = kc.TINY if args.tiny else kc.LLAMA_8B
    groups: list[tuple[str, list[dict]]] = []
    decode_shapes = ([(2, 40, [1, 2])] if args.tiny else
                     [(1, 520, [8, 16, 32]), (64, 536, [1, 2, 4]), (256, 384, [1, 2]), (256, 1536, [1, 2])])
    for batch, seq_len, splits in decode_shapes:
        groups.append((f"decode B={batch} seq~{seq_len}", sweep_decode(b, m, batch, seq_len, splits)))
    extend_cases = ([("2 x 40", [(0, 40)] * 2)] if args.tiny else
                    [("4 prompts x 2048", [(0, 2048)] * 4), ("16 x (2048 cached + 128)", [(2048, 128)] * 16),
                     ("1 prompt x 2048", [(0, 2048)])])
    for label, cases in extend_cases:
        groups.append((f"extend {label}", sweep_extend(b, m, cases, label)))

    summary = []
    for name, rows in groups:
        good = [r for r in rows if r.get("ok")]
        best = min(good, key=lambda r: r["median_us"]) if good else None
        default = [r for r in good if _is_default(r, b.dtype, m.head_dim)]
        metric = "gb_per_s" if name.startswith("decode") else "tflop_per_s"
        for label, r in (("default", min(default, key=lambda r: r["median_us"]) if default else None), ("best", best)):
            if r is None:
                continue
            knobs = {k: r[k] for k in ("splits", "block_m", "block_n", "num_warps", "num_stages") if k in r}
            summary.append({"shape": name, "which": label, "median_us": r["median_us"], metric: r[metric], **knobs})
        print(f"{name}: {len(good)}/{len(rows)} candidates ok")
    for s in summary:
        print(json.dumps(s))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                       "summary": summary, "rows": [r for _, rows in groups for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
