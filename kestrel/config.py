"""Typed, frozen configuration of the engine, resolved and validated once.

`ModelConfig` is the architecture (from a Hugging Face config.json dict, or the
dict a GGUF file's metadata is turned into). `EngineConfig` is what the user
chose (model path, dtype, memory and batching limits). Nothing here mutates
after construction; derived values are properties. No torch import: dtypes are
names (strings) resolved by the worker.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
EXECUTOR_BACKENDS = ("uni", "mp")
SCHEDULE_POLICIES = ("fcfs", "lpm")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama family, Qwen2)."""

    architecture: str
    """Hugging Face `architectures[0]`, e.g. "LlamaForCausalLM"; picks the model class."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...] | None
    """Rope scaling dict as sorted (key, value) pairs (frozen), e.g. llama3 factors; None for plain RoPE."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    eos_token_ids: tuple[int, ...]
    """Every id that ends generation (config.json + generation_config.json)."""
    bos_token_id: int | None
    torch_dtype: str
    """The checkpoint's dtype name ("bfloat16", "float32", ...)."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_hf_config(cls, cfg: dict, extra_eos_ids: tuple[int, ...] = (),
                       defaults: dict | None = None) -> ModelConfig:
        """Build from a config.json dict; raise ValueError for what we cannot run.

        `defaults` are what the architecture implies for fields config.json leaves out (the model
        class's `config_defaults`, e.g. Qwen2's q/k/v bias).
        """
        defaults = defaults or {}
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot pick a model class.")
        heads = _req(cfg, "num_attention_heads")
        hidden = _req(cfg, "hidden_size")
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope_scaling, dict):
            rope_theta = rope_theta or rope_scaling.get("rope_theta")
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling = None if kind == "default" else rope_scaling
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        for extra in extra_eos_ids:
            if extra not in eos_ids:
                eos_ids += (extra,)
        return cls(
            architecture=archs[0],
            vocab_size=_req(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req(cfg, "intermediate_size"),
            num_layers=_req(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", defaults.get("attention_bias", False))),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )


def _req(cfg: dict, key: str):
    if key not in cfg:
        raise ValueError(f"config.json is missing '{key}'.")
    return cfg[key]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the user asked for; validated in __post_init__."""

    model: str | None = None
    """Hugging Face folder or GGUF file; None means the bundled SmolLM2-135M-Instruct GGUF."""
    tokenizer: str | None = None
    """Tokenizer folder/file if different from `model`."""
    dtype: str = "auto"
    """Weights and activations: float32, bfloat16, float16, or auto: float32 on CPU (exact, batch-invariant;
    bfloat16 is faster on CPUs with AVX512-BF16 or AMX), the checkpoint dtype on GPU (bfloat16 for float32)."""
    device: str = "auto"
    """cpu, cuda (cuda:N) or auto: cuda when a GPU is visible, else cpu."""
    load_format: str = "auto"
    """auto, safetensors, gguf, or dummy (random weights of the model's shape, for benchmarks)."""
    max_model_len: int | None = None
    """Context length; None means the model's max_position_embeddings."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (prefill chunks + decodes)."""
    kv_cache_memory_gb: float | None = None
    """Memory for the KV cache (ignored when num_kv_slots is given). None: 1 GB on CPU; on a GPU, what
    `gpu_memory_utilization` leaves after the weights and a profiled forward pass at the largest step."""
    gpu_memory_utilization: float = 0.9
    """GPU: the fraction of the device's memory Kestrel may use in all (weights, activations, KV pool)."""
    enforce_eager: bool = False
    """GPU: run every step eagerly instead of replaying CUDA graphs for decode steps."""
    mixed_graph_max_tokens: int = 512
    """GPU: mixed steps (prefill + decodes) of up to this many tokens replay piecewise CUDA graphs, one per
    64-token bucket, captured at start-up (worker/piecewise_graphs.py); 0 turns them off."""
    async_scheduling: bool | None = None
    """Build step N+1 while step N runs (its sampled tokens are read one step late; a request stopped by
    EOS may compute one extra token, which is dropped). None: on for CUDA, off on CPU."""
    num_kv_slots: int | None = None
    """Exact number of KV slots (tokens) in the pool; mostly for tests."""
    seed: int = 0
    """Seed of the shared generator used by requests without their own seed."""
    num_threads: int | None = None
    """CPU threads for torch; None leaves torch's default."""
    prepack_weights: bool = True
    """CPU: reorder linear weights once for oneDNN (2-4x faster matmuls; same maths to float rounding)."""
    compile_decode: bool = False
    """CPU: run decode steps as one torch.compile'd graph (inductor: fused elementwise ops, attention read
    through the slot table); compiled at start-up (tens of seconds on 2 cores, cached on disk)."""
    compile_prefill: bool = False
    """CPU: run the parts of prefill and mixed steps between attention calls as one torch.compile'd graph
    (fused norms, RoPE, activations; worker/compiled_prefill.py); compiled at start-up (~20 s on 2 cores)."""
    cpu_quantized_decode: bool = False
    """CPU: matmuls of a few rows (decode at small batch: up to 8 rows on int4, 4 on int8) read quantized
    weights: int4 where a GGUF stores the weight as Q4_0/Q4_1 (its own codes, scales rounded to bf16), int8 per
    output row rounded from the float weight otherwise; activations in bf16. Faster, slightly different results
    (which also depend on a step's row count); needs float32 or bfloat16 weights and prepacking. Larger matmuls keep the
    float32 weights."""
    attention_backend: str = "auto"
    """Attention implementation (`kestrel.attention.create_backend`): torch (the reference, any device),
    triton (GPU kernels), or auto: triton on CUDA, torch elsewhere."""
    distributed_executor_backend: str = "uni"
    """uni: the worker runs in the engine's process; mp: in a child process (step batches cross as bytes)."""
    jump_forward: bool = True
    """Structured outputs: append the tokens a grammar forces in one step instead of one forward pass each."""
    grammar_cache_size: int = 128
    """Structured outputs: compiled grammars kept (LRU, keyed by the schema / regex / grammar text)."""
    enable_prefix_caching: bool = True
    """Keep computed KV in a radix tree of token prefixes and reuse it for requests that share a prefix."""
    schedule_policy: str = "fcfs"
    """Order of waiting requests: fcfs (arrival), or lpm (longest cached prefix first when the queue is long)."""
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}.")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                             f"got {self.distributed_executor_backend!r}.")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {', '.join(SCHEDULE_POLICIES)}, "
                             f"got {self.schedule_policy!r}.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.mixed_graph_max_tokens < 0 or self.mixed_graph_max_tokens % 64:
            raise ValueError(f"mixed_graph_max_tokens must be a multiple of 64 (0 = off), "
                             f"got {self.mixed_graph_max_tokens}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.")
        if self.grammar_cache_size < 1:
            raise ValueError(f"grammar_cache_size must be >= 1, got {self.grammar_cache_size}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}.")
        if self.num_kv_slots is not None and self.num_kv_slots < 1:
            raise ValueError(f"num_kv_slots must be >= 1, got {self.num_kv_slots}.")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}.")
        if self.cpu_quantized_decode:
            if self.device.startswith("cuda"):
                raise ValueError(f"cpu_quantized_decode runs on CPU only; got device {self.device!r} "
                                 "(pass device cpu, or drop cpu_quantized_decode).")
            if self.dtype not in ("auto", "float32", "bfloat16"):
                raise ValueError("cpu_quantized_decode needs float32 or bfloat16 weights (dtype auto, float32 or "
                                 f"bfloat16), got {self.dtype!r}.")
            if not self.prepack_weights:
                raise ValueError("cpu_quantized_decode needs prepack_weights (its larger matmuls run on the packed "
                                 "weights); drop --no-prepack-weights.")
