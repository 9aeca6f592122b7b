"""Model loading from Hugging Face folders: sharded safetensors, generation config, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kestrel.config import EngineConfig
from kestrel.engine import Engine
from kestrel.models.loader import build_model, load_model_config, resolve_model_path
from tests.conftest import make_tiny_hf_model


def _params(path: str) -> dict[str, torch.Tensor]:
    cfg = load_model_config(path)
    model = build_model(path, cfg, torch.float32, "cpu", max_position=64, show_progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_safetensors_load_like_a_single_file(tmp_path):
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    hf = make_tiny_hf_model(single, "llama")
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="50KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    a, b = _params(single), _params(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generation_config_adds_eos_ids(tmp_path):
    make_tiny_hf_model(str(tmp_path), "llama")
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 7, 9]}, f)
    assert load_model_config(str(tmp_path)).eos_token_ids == (2, 7, 9)


def test_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("/no/such/model")


def test_unsupported_architecture_is_named(tmp_path):
    make_tiny_hf_model(str(tmp_path), "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM.*supported"):
        Engine(EngineConfig(model=str(tmp_path), show_progress=False))


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    make_tiny_hf_model(str(tmp_path), "llama")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        Engine(EngineConfig(model=str(tmp_path), show_progress=False))


def test_missing_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_hf_model(str(tmp_path), "llama")
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        Engine(EngineConfig(model=str(tmp_path), show_progress=False))


def test_not_a_model_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"hello")
    with pytest.raises(ValueError, match="neither"):
        resolve_model_path(str(bogus))
