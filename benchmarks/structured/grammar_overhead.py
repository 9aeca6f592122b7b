"""CPU cost of the grammar path per step at batch 16, without the model (process CPU time, so a
shared machine's load matters less): 16 matchers fill their bitmask, the worker's processor applies
them to [16, vocab] logits, each matcher accepts the argmax and looks for a jump-forward string.

    PYTHONPATH=. python benchmarks/structured/grammar_overhead.py benchmarks/structured/users.schema.json
"""

import json
import sys
import time

import torch

from kestrel.frontend.tokenizer import load_tokenizer
from kestrel.model_files import default_model_path
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.structured import StructuredOutputManager
from kestrel.structured_outputs import StructuredOutputsParams
from kestrel.worker.logits_processors import GrammarBitmask
from kestrel.worker.sampler import SamplingRow

tokenizer = load_tokenizer(default_model_path())
manager = StructuredOutputManager(lambda: tokenizer, 49152, (2,), jump_forward=False)
params = SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(json=open(sys.argv[1]).read()))
requests = [Request.new(f"r{i}", [1], params, i) for i in range(16)]
for r in requests:
    manager.add(r)
torch.manual_seed(0)
num_steps, cpu = 0, {"fill": 0.0, "apply": 0.0, "accept": 0.0}
while requests and num_steps < 200:
    t0 = time.process_time()
    masks = [manager.bitmask(r) for r in requests]
    t1 = time.process_time()
    logits = torch.randn(len(requests), 49152)  # [16, vocab]
    rows = [SamplingRow(params, None, (), (), (), m) for m in masks]
    t2 = time.process_time()
    GrammarBitmask().apply_(logits, GrammarBitmask().prepare(rows, torch.device("cpu")), None)
    tokens = logits.argmax(dim=-1).tolist()
    t3 = time.process_time()
    for r, t in zip(requests, tokens):
        r.token_ids.append(t)
        manager.advance(r, t, 0)
        matcher = manager._matchers.get(r.request_id)
        if matcher is not None and not matcher.is_terminated():
            matcher.find_jump_forward_string()
    t4 = time.process_time()
    cpu["fill"] += t1 - t0
    cpu["apply"] += t3 - t2
    cpu["accept"] += t4 - t3
    num_steps += 1
    requests = [r for r in requests if r.request_id in manager._matchers
                and not manager._matchers[r.request_id].is_terminated()]
print(json.dumps({k: round(v / num_steps * 1e3, 3) for k, v in cpu.items()} | {"steps": num_steps,
                 "unit": "ms of CPU per step at batch <= 16"}))
