"""The Hugging Face transformers baseline of `kestrel bench offline --backend hf`.

Loads the same model with transformers (a Hugging Face folder, or a GGUF file
through `from_pretrained(folder, gguf_file=name)`, which dequantizes it; random
weights of the model's config for `--load-format dummy`), then runs
`model.generate` over the same prompts in static batches of `batch_size`:
greedy when the temperature is 0, sampling otherwise, and exactly
`output_len` new tokens (`min_new_tokens = max_new_tokens`). A streamer
timestamps every generated step, so the HF figures (TTFT, per-step TPOT) are
measured exactly like the engine's and reported by the same code.
"""

from __future__ import annotations

import os
import time

import torch

from kestrel.bench.offline import OfflineResult, OfflineSpec, RunTiming, random_prompts, summarize, time_runs

_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _StepClock:
    """A transformers streamer that only records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:  # generate() first hands over the prompt
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model: str | None, dtype: str, load_format: str, spec: OfflineSpec) -> OfflineResult:
    """Benchmark transformers `generate` on `spec`; `model` None means the bundled GGUF."""
    from kestrel.model_files import resolve_model_path

    path = resolve_model_path(model)
    torch_dtype = _DTYPES[dtype]
    hf_model = load_hf_model(path, torch_dtype, load_format)
    vocab = hf_model.config.vocab_size
    prompts = random_prompts(spec.num_prompts, spec.input_len, vocab, spec.seed)
    if spec.num_warmup_tokens:
        _time_generate(hf_model, prompts[:spec.batch_size], spec, spec.num_warmup_tokens)
    timings = time_runs(lambda i: _time_generate(hf_model, prompts, spec, spec.output_len), spec)
    return summarize("hf", path, str(torch_dtype).removeprefix("torch."), spec, timings)


def load_hf_model(path: str, dtype: torch.dtype, load_format: str = "auto"):
    """A transformers causal LM from a folder or GGUF file, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {}
    folder = path
    if os.path.isfile(path):
        folder, kwargs["gguf_file"] = os.path.dirname(path) or ".", os.path.basename(path)
    if load_format == "dummy":
        config = AutoConfig.from_pretrained(folder, **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.eval()


def _time_generate(model, prompts: list[list[int]], spec: OfflineSpec, num_new: int) -> RunTiming:
    timing = RunTiming(0.0, 0)
    start = time.perf_counter()
    for first in range(0, len(prompts), spec.batch_size):
        batch = torch.tensor(prompts[first:first + spec.batch_size])  # [B, input_len]
        clock = _StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=num_new,
                min_new_tokens=num_new, do_sample=spec.temperature > 0,
                temperature=spec.temperature if spec.temperature > 0 else None, top_p=None, top_k=None,
                pad_token_id=_pad_id(model), streamer=clock)
        timing.num_output_tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
        if clock.times:
            timing.ttft_s.extend([clock.times[0] - start] * batch.shape[0])
            steps = [b - a for a, b in zip([t0, *clock.times], clock.times)][1:]
            timing.decode_step_s.extend(steps)
            timing.decode_step_batch.extend([batch.shape[0]] * len(steps))
    timing.elapsed_s = time.perf_counter() - start
    return timing


def _pad_id(model) -> int:
    cfg = model.generation_config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    return cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
