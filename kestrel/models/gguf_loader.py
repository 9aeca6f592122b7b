"""Read a GGUF checkpoint as Hugging Face config and weights.

Owns everything GGUF-specific on the weight side: validating the file, turning
llama.cpp metadata into a Hugging Face ``config.json``-style dict, mapping
GGUF tensor names to Hugging Face parameter names, dequantizing each tensor
to float32 and undoing llama.cpp's Q/K row permutation for ``llama``.

Input: the path of a single-file GGUF (arch ``llama`` or ``qwen2``).
Output: a `GGUFCheckpoint` whose ``hf_config`` the model registry reads like a
``config.json`` and whose ``iter_weights()`` yields ``(hf_name, tensor)`` pairs
that the model's weight loaders take exactly as they take safetensors weights.
Tensors are dequantized lazily, one at a time, so peak memory is one float32
tensor on top of the memory-mapped file. The tokenizer lives in
``kestrel/frontend/gguf_tokenizer.py``.

``iter_int4_weights()`` yields the Q4_0 / Q4_1 weights again, as the file's own 4-bit codes and
block scales in the CPU int4 kernel's format (``kestrel/kernels/cpu_quant.py``), rows unpermuted
like the float32 ones: the same weights, for ``--cpu-quantized-decode``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from kestrel.kernels.cpu_quant import GROUP_SIZE, Int4Weight, from_gguf_q4_0, from_gguf_q4_1
from kestrel.model_files import is_gguf_file

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""GGUF ``general.architecture`` -> Hugging Face ``architectures[0]``."""



# Plain (not block-quantized) GGML types and their numpy dtypes.
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors: recomputed from hf_config["rope_scaling"]


class _TensorRecord(NamedTuple):
    """Where one tensor lives in the file and how to turn it into an HF tensor."""

    gguf_name: str
    hf_name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy / torch order (HF layout), i.e. reversed GGUF ne order
    data_offset: int  # absolute byte offset in the file
    n_bytes: int
    unpermute_heads: int  # > 0: undo llama.cpp's rotary row permutation with this many heads


@dataclass(frozen=True, slots=True)
class GGUFCheckpoint:
    """A validated GGUF file, seen as a Hugging Face checkpoint. Build it with `read_gguf`."""

    path: str
    """Path of the .gguf file."""
    hf_config: dict
    """Hugging Face config.json-style dict (architectures, hidden_size, ...)."""
    tensors: tuple[_TensorRecord, ...] = field(default=(), repr=False)
    """Tensors that `iter_weights` yields, in file order."""

    @property
    def num_tensors(self) -> int:
        """Number of (name, tensor) pairs `iter_weights` yields."""
        return len(self.tensors)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, float32 CPU tensor in HF layout)``, dequantizing one tensor at a time."""
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            for record in self.tensors:
                array = _dequantize(data, record)  # [*record.shape] float32
                if record.unpermute_heads:
                    array = _unpermute_rows(array, record.unpermute_heads)
                yield record.hf_name, torch.from_numpy(array)
        finally:
            del data

    def iter_int4_weights(self) -> Iterator[tuple[str, Int4Weight]]:
        """Yield ``(hf_name, Int4Weight)`` for every 2-D Q4_0 / Q4_1 tensor: the file's codes, HF row order."""
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            for record in self.tensors:
                if record.qtype in _Q4_BLOCK_BYTES and len(record.shape) == 2:
                    yield record.hf_name, _int4_weight(data, record)
        finally:
            del data


def read_gguf(path: str) -> GGUFCheckpoint:
    """Parse and validate a GGUF file's metadata and tensor table; weights are read by `iter_weights`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; pass the path of a single .gguf file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF checkpoint {path!r}: no such file")
    reader = _open_reader(path)
    fields = _Fields(reader)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{path!r}: GGUF architecture {arch!r} is not supported; "
            f"supported architectures: {', '.join(repr(a) for a in SUPPORTED_ARCHS)}"
        )
    split_count = fields.get("split.count", 1)
    if split_count > 1:
        raise ValueError(
            f"{path!r} is shard 1 of a {split_count}-file split GGUF; merge the shards first "
            "(llama-gguf-split --merge) and pass the merged file"
        )
    by_name = {t.name: t for t in reader.tensors}
    hf_config = _build_hf_config(path, arch, fields, by_name)
    records = tuple(_tensor_records(path, arch, reader.tensors, hf_config))
    return GGUFCheckpoint(path=path, hf_config=hf_config, tensors=records)


# ---------------------------------------------------------------------------
# File and metadata
# ---------------------------------------------------------------------------


def _open_reader(path: str) -> GGUFReader:
    """Open ``path`` with gguf's reader, turning any parse failure into a clear ValueError."""
    if not is_gguf_file(path):
        raise ValueError(f"{path!r} is not a valid GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on bad input
        raise ValueError(
            f"{path!r} is not a valid or complete GGUF file (truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from e
    if reader.byte_order != "I":
        raise ValueError(f"{path!r}: big-endian GGUF files are not supported")
    file_size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > file_size:
            raise ValueError(
                f"{path!r} is not a complete GGUF file (truncated?): tensor {t.name!r} ends at byte "
                f"{t.data_offset + t.n_bytes} but the file has {file_size} bytes"
            )
    return reader


class _Fields:
    """Typed access to GGUF key/value metadata."""

    def __init__(self, reader: GGUFReader):
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field_ = self._fields.get(key)
        return default if field_ is None else field_.contents()

    def array_len(self, key: str) -> int | None:
        """Element count of an array field without decoding it (None when absent)."""
        field_ = self._fields.get(key)
        return None if field_ is None else len(field_.data)

    def require(self, path: str, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{path!r}: GGUF metadata key {key!r} is missing")
        return value


def _build_hf_config(path: str, arch: str, fields: _Fields, by_name: dict) -> dict:
    """Translate llama.cpp metadata (``{arch}.*`` keys) into a Hugging Face config dict."""
    hidden_size = int(fields.require(path, f"{arch}.embedding_length"))
    num_heads = int(fields.require(path, f"{arch}.attention.head_count"))
    num_kv_heads = int(fields.get(f"{arch}.attention.head_count_kv", num_heads))
    head_dim = fields.get(f"{arch}.attention.key_length") or fields.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden_size // num_heads
    rope_theta = float(fields.get(f"{arch}.rope.freq_base", 10000.0))
    has_q_bias = any(re.fullmatch(r"blk\.\d+\.attn_q\.bias", name) for name in by_name)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [SUPPORTED_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": _vocab_size(path, arch, fields, by_name),
        "hidden_size": hidden_size,
        "intermediate_size": int(fields.require(path, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(fields.require(path, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(fields.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(path, arch, fields, by_name.get("rope_freqs.weight"), rope_theta,
                                      head_dim),
        "max_position_embeddings": int(fields.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in by_name,
        "attention_bias": arch == "qwen2" or has_q_bias,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "torch_dtype": "float32",
    }


def _vocab_size(path: str, arch: str, fields: _Fields, by_name: dict) -> int:
    """``{arch}.vocab_size``, else the tokenizer's token count, else the embedding's row count."""
    size = fields.get(f"{arch}.vocab_size")
    if size is not None:
        return int(size)
    num_tokens = fields.array_len("tokenizer.ggml.tokens")
    if num_tokens is not None:
        return num_tokens
    embed = by_name.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{path!r}: cannot tell the vocabulary size (no vocab_size, tokens or token_embd)")
    return int(embed.shape[-1])  # GGUF ne order: [hidden, vocab]


def _rope_scaling(path, arch, fields, rope_freqs, rope_theta, head_dim) -> dict | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` metadata or a llama3 ``rope_freqs`` tensor."""
    kind = fields.get(f"{arch}.rope.scaling.type")
    factor = fields.get(f"{arch}.rope.scaling.factor")
    if kind is None and fields.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", fields.get(f"{arch}.rope.scale_linear")
    if kind == "linear" and factor and float(factor) != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        original = fields.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none", "linear"):
        raise ValueError(f"{path!r}: rope scaling type {kind!r} is not supported (linear, yarn, llama3)")
    if rope_freqs is not None:
        factors = np.asarray(rope_freqs.data, dtype=np.float64).reshape(-1)  # [head_dim // 2]
        return _fit_llama3_rope_scaling(path, factors, rope_theta, head_dim)
    return None


def _llama3_rope_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int):
    """The per-frequency divisors llama.cpp stores in ``rope_freqs`` for Llama 3.1-style scaling."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _fit_llama3_rope_scaling(path, factors: np.ndarray, rope_theta: float, head_dim: int) -> dict | None:
    """Recover llama3 ``rope_scaling`` parameters from the stored factors (GGUF keeps only the tensor)."""
    if np.allclose(factors, 1.0):
        return None
    if factors.shape[0] * 2 != head_dim:
        raise ValueError(f"{path!r}: rope_freqs has {factors.shape[0]} entries, expected {head_dim // 2}")
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0, 1.5):
                if high <= low:
                    continue
                expected = _llama3_rope_factors(inv_freq, factor, low, high, original)
                if np.allclose(expected, factors, rtol=1e-4, atol=1e-6):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ValueError(
        f"{path!r}: the rope_freqs tensor does not match Llama 3 rope scaling for any usual "
        "(original context, low/high frequency factor); this rope scaling is not supported"
    )


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


def _tensor_records(path: str, arch: str, tensors, hf_config: dict) -> Iterator[_TensorRecord]:
    """Map each GGUF tensor to its HF name, shape and dequantization recipe; reject unknown ones."""
    for t in tensors:
        if t.name in _SKIPPED:
            continue
        hf_name = _hf_name(t.name)
        if hf_name is None:
            raise ValueError(
                f"{path!r}: tensor {t.name!r} has no Hugging Face equivalent for architecture {arch!r}"
            )
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype not in _PLAIN_DTYPES and qtype not in gguf.quants._type_traits:
            raise ValueError(
                f"{path!r}: tensor {t.name!r} has quantization type {qtype.name}, "
                "which this gguf package cannot dequantize"
            )
        yield _TensorRecord(
            gguf_name=t.name,
            hf_name=hf_name,
            qtype=qtype,
            shape=tuple(int(d) for d in reversed(t.shape.tolist())),  # ne order -> torch order
            data_offset=int(t.data_offset),
            n_bytes=int(t.n_bytes),
            unpermute_heads=_unpermute_heads(arch, t.name, hf_config),
        )


def _hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _unpermute_heads(arch: str, gguf_name: str, hf_config: dict) -> int:
    """Heads to unpermute with: llama.cpp permutes llama's Q (n_head) and K (n_head_kv) rows."""
    if arch != "llama":
        return 0
    if ".attn_q." in gguf_name:
        return hf_config["num_attention_heads"]
    if ".attn_k." in gguf_name:
        return hf_config["num_key_value_heads"]
    return 0


def _dequantize(data: np.memmap, record: _TensorRecord) -> np.ndarray:
    """Read one tensor's bytes from the mapped file and return a fresh float32 array in HF shape."""
    raw = data[record.data_offset: record.data_offset + record.n_bytes]  # [n_bytes] uint8
    plain = _PLAIN_DTYPES.get(record.qtype)
    if plain is not None:
        array = raw.view(plain).reshape(record.shape)
        return np.array(array, dtype=np.float32, copy=True)  # copy: never hand out the memmap
    byte_shape = gguf.quant_shape_to_byte_shape(record.shape, record.qtype)
    try:
        array = gguf.quants.dequantize(raw.reshape(byte_shape), record.qtype)  # [*shape] float32
    except NotImplementedError as e:
        raise ValueError(
            f"{record.gguf_name!r}: dequantizing {record.qtype.name} is not implemented in gguf"
        ) from e
    return np.ascontiguousarray(array, dtype=np.float32).reshape(record.shape)


_Q4_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}
"""Bytes per block of 32 weights: fp16 d, (Q4_1: fp16 m), 16 bytes of nibbles."""


def _int4_weight(data: np.memmap, record: _TensorRecord) -> Int4Weight:
    """One Q4_0 / Q4_1 tensor's blocks as int4 codes and scales (w = d (q - 8), or d q + m)."""
    rows, cols = record.shape
    raw = data[record.data_offset: record.data_offset + record.n_bytes]
    blocks = raw.reshape(rows, cols // GROUP_SIZE, _Q4_BLOCK_BYTES[record.qtype])  # [N, K/32, bytes]
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]  # [N, K/32]
    nibbles = blocks[..., -16:]  # [N, K/32, 16]: byte j holds weight j (low) and weight 16 + j (high)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)  # [N, K]
    parts = [d, q]
    if record.qtype == GGMLQuantizationType.Q4_1:
        parts.insert(1, np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0])  # m [N, K/32]
    if record.unpermute_heads:
        parts = [_unpermute_rows(p, record.unpermute_heads) for p in parts]
    tensors = [torch.from_numpy(np.ascontiguousarray(p)) for p in parts]
    if record.qtype == GGMLQuantizationType.Q4_1:
        return from_gguf_q4_1(*tensors)
    return from_gguf_q4_0(*tensors)


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's ``permute``: per head, rows ``[r0 r2 r4 .. r1 r3 ..]`` -> interleaved.

    llama.cpp turns HF's half-split rotary layout into GPT-J's interleaved pairs with
    ``w.reshape(H, 2, D/2, ...).swapaxes(1, 2)``; this is the exact inverse. Works on
    weights ``[H * D, in]`` and biases ``[H * D]``.
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot unpermute {rows} rows over {num_heads} heads (need a multiple of 2*heads)")
    half = rows // num_heads // 2
    out = w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)  # [H, 2, D/2, ...]
    return np.ascontiguousarray(out.reshape(w.shape))
