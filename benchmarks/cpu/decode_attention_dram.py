"""The CPU decode-attention kernel reading from memory: 30 layers of bf16 caches round robin (as a
decode step reads them), SmolLM2's heads (9 query, 3 KV, D 64), contiguous slots; median of 5.

    python benchmarks/cpu/decode_attention_dram.py [--hot]

--hot: one layer's caches 30 times (from cache: the kernel's compute alone).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from kestrel.kernels import cpu_attention


def main() -> None:
    if not cpu_attention.load():
        raise SystemExit("the C++ CPU kernels do not build here")
    torch.set_num_threads(2)
    for rows, keys in ((16, 300), (8, 560), (4, 200)):
        slots = rows * keys + 16
        layers = [(torch.randn(slots, 3, 64).bfloat16(), torch.randn(slots, 3, 64).bfloat16())
                  for _ in range(1 if "--hot" in sys.argv else 30)] * (30 if "--hot" in sys.argv else 1)
        index = torch.arange(rows * keys).view(rows, keys)
        mask = torch.ones(rows, keys, dtype=torch.bool)
        q = torch.randn(rows, 9, 64).bfloat16()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                for k_cache, v_cache in layers:
                    cpu_attention.decode_attention(q, k_cache, v_cache, index, mask)
            times.append((time.perf_counter() - start) / 120 * 1e6)
        us = statistics.median(times)
        kv_bytes = rows * keys * 3 * 64 * 2 * 2
        print(f"{rows} requests x {keys} keys: {us:.0f} us a call ({kv_bytes / us / 1e3:.1f} GB/s of KV)", flush=True)


if __name__ == "__main__":
    main()
