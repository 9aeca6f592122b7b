"""Host time of the engine's bookkeeping on a GPU workload, on the CPU alone (no model, no device).

    python benchmarks/gpu/scheduler_host.py [--num-prompts 2000 --input-len 256 --output-len 256] [--no-cache]

Runs the real scheduler, KV manager and radix cache over the H200's pool (882,706 slots), 256 seats
and an 8192-token budget, as async scheduling does (schedule, build the batch and commit step N+1,
then apply step N's fake tokens), and prints the host milliseconds per step. On a GPU these are
hidden behind the device's step only while they stay below it (~7-12 ms at 256 requests): this is
how the n2000 256/256 regression after the radix merge (one leaf scan per decoding request per step
once the pool filled with cached prompts: 35 ms per step here, 9.3k instead of 13.5k tok/s there)
was found and checked without a GPU.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from kestrel.kvcache.manager import KVCacheManager
from kestrel.kvcache.prefix_cache import NoPrefixCache
from kestrel.kvcache.radix_cache import RadixCache
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler import Scheduler, build_step_batch
from kestrel.step_batch import StepResult
from kestrel.stop_rules import StopRules


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=2000)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-slots", type=int, default=882_706)
    parser.add_argument("--no-cache", action="store_true", help="NoPrefixCache instead of the radix cache")
    args = parser.parse_args()
    cache = NoPrefixCache if args.no_cache else RadixCache
    kv = KVCacheManager(args.num_slots, 256, 4096, cache)
    stop = StopRules((2,), 4096)
    sched = Scheduler(kv, stop, 256, 8192)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        sched.add(Request.new(str(i), [rng.randrange(3, 128_000) for _ in range(args.input_len)], params, i))
    times, inflight = [], None
    start = time.perf_counter()
    while sched.has_unfinished or inflight is not None:
        t = time.perf_counter()
        out = sched.schedule()
        if not out.is_empty:
            build_step_batch(out, kv, stop, sched.take_finished_ids())
            sched.commit(out)
        if inflight is not None:
            sched.update(inflight, StepResult([5] * len(inflight.sampled)))
        inflight = None if out.is_empty else out
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    times.sort()
    print(f"{cache.__name__}: {len(times)} steps, {elapsed:.1f} s of host time, mean {elapsed / len(times) * 1e3:.2f} "
          f"ms/step, median {times[len(times) // 2] * 1e3:.2f}, p90 {times[int(len(times) * 0.9)] * 1e3:.2f}, "
          f"max {times[-1] * 1e3:.1f}")
    kv.check_integrity()
    return 0


if __name__ == "__main__":
    sys.exit(main())
