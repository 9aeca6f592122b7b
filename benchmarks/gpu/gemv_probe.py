"""Sweep `kestrel.kernels.skinny_gemm` launch settings against cuBLAS on the Llama-3.1-8B matmul shapes.

Each shape is timed as 32 calls on 32 different weights (as a decode step's layers are, so nothing is
served from L2) captured in one CUDA graph, replayed; figures are per call and in TB/s of weight read.
Also times a plain read of the same bytes (torch.sum) as the read floor.

    python3 benchmarks/gpu/gemv_probe.py --out /tmp/gemv.json [--rows 1 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kestrel.kernels.skinny_gemm import SkinnyTuning, skinny_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
COPIES = {"lm_head": 2}  # 1 GB each: already far beyond L2


def candidates() -> list[SkinnyTuning]:
    out = []
    for bn, bk in ((4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256), (4, 2048), (2, 2048)):
        for warps in (4, 8):
            for stages in (1, 3):
                out.append(SkinnyTuning(bn, bk, warps, stages, use_dot=False))
    for bn, bk in ((16, 128), (16, 256), (32, 64), (32, 128), (32, 256), (64, 64), (64, 128)):
        for stages in (3, 4, 6):
            for warps in (4, 8) if bn * bk >= 8192 else (4,):
                out.append(SkinnyTuning(bn, bk, warps, stages, use_dot=True))
    return out


def time_graph(fn, reps: int = 10) -> float:
    """Seconds per replay of a graph holding fn()'s launches."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def sweep_shape(name: str, ws: list[torch.Tensor], rows: int, cands: list[SkinnyTuning], deadline: float) -> dict:
    """cuBLAS and every candidate on `rows` x K against the weights `ws` (one shape)."""
    n, k = SHAPES[name]
    nbytes_call = n * k * 2
    x = torch.randn(rows, k, device=ws[0].device, dtype=torch.bfloat16)
    outs = [torch.empty(rows, n, device=x.device, dtype=torch.bfloat16) for _ in ws]
    ref = F.linear(x.float(), ws[0].float())
    entry = {"cublas_us": 1e6 * time_graph(lambda: [torch.mm(x, w.t(), out=o) for w, o in zip(ws, outs)]) / len(ws)}
    entry["cublas_tbs"] = nbytes_call / entry["cublas_us"] / 1e6
    best, tried = None, []
    for c in cands:
        if time.time() > deadline or (rows > 2 and not c.use_dot) or k % c.block_k:
            continue
        try:
            y = skinny_linear(x, ws[0], tuning=c)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                tried.append({"tuning": repr(c), "error": err})
                continue
            calls = lambda c=c: [skinny_linear(x, w, tuning=c, out=o) for w, o in zip(ws, outs)]  # noqa: E731
            us = 1e6 * time_graph(calls) / len(ws)
        except Exception as e:  # noqa: BLE001 (a launch setting the compiler refuses)
            tried.append({"tuning": repr(c), "failed": str(e)[:200]})
            continue
        tried.append({"tuning": repr(c), "us": us, "tbs": nbytes_call / us / 1e6})
        if best is None or us < best[0]:
            best = (us, c)
    entry["best_us"], entry["best"] = (best[0], repr(best[1])) if best else (None, None)
    entry["best_tbs"] = nbytes_call / best[0] / 1e6 if best else None
    entry["tried"] = sorted(tried, key=lambda t: t.get("us", 1e9))[:8]
    print(f"M={rows:2d} {name:8s} cuBLAS {entry['cublas_us']:8.1f} us ({entry['cublas_tbs']:.2f} TB/s)  "
          f"best {entry['best_us'] or 0:8.1f} us ({entry['best_tbs'] or 0:.2f} TB/s) {entry['best']}", flush=True)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    dev = "cuda"
    weights = {name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                      for _ in range(COPIES.get(name, 32))] for name, (n, k) in SHAPES.items()}
    result = {"device": torch.cuda.get_device_name(), "shapes": {}, "read_floor_tbs": {}}
    for name, ws in weights.items():
        nbytes = sum(w.numel() * 2 for w in ws)
        secs = time_graph(lambda ws=ws: [w.sum(dtype=torch.float32) for w in ws])
        result["read_floor_tbs"][name] = nbytes / secs / 1e12
    print("read floor (torch.sum) TB/s:", {k: round(v, 2) for k, v in result["read_floor_tbs"].items()}, flush=True)
    cands = candidates()
    for rows in args.rows:
        for name, ws in weights.items():
            result["shapes"][f"{name}_m{rows}"] = sweep_shape(name, ws, rows, cands, t0 + args.budget_s)
        # a whole step's matmuls (32 layers + LM head) at this row count
        entries = {s: result["shapes"][f"{s}_m{rows}"] for s in SHAPES}
        counts = {s: 1 if s == "lm_head" else 32 for s in SHAPES}
        cub = sum(e["cublas_us"] * counts[s] for s, e in entries.items())
        ours = sum(min(e["best_us"] or 1e9, e["cublas_us"]) * counts[s] for s, e in entries.items())
        result[f"step_m{rows}"] = {"cublas_ms": cub / 1e3, "best_of_both_ms": ours / 1e3}
        print(f"M={rows}: step matmuls cuBLAS {cub / 1e3:.3f} ms, best of both {ours / 1e3:.3f} ms", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
