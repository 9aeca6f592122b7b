"""Llama-family decoders: Llama 2/3 (incl. llama3 RoPE scaling), Mistral, SmolLM, TinyLlama, and
Qwen2 (q/k/v bias). The blocks live in `models/common.py`; this file names the checkpoint layout.
"""

from __future__ import annotations

from kestrel.models.common import CausalLM
from kestrel.models.weights import StackedParam

_LLAMA_STACKED = (
    StackedParam(".q_proj", ".qkv_proj", "q"),
    StackedParam(".k_proj", ".qkv_proj", "k"),
    StackedParam(".v_proj", ".qkv_proj", "v"),
    StackedParam(".gate_proj", ".gate_up_proj", 0),
    StackedParam(".up_proj", ".gate_up_proj", 1),
)


class LlamaForCausalLM(CausalLM):
    stacked_params = _LLAMA_STACKED


class Qwen2ForCausalLM(CausalLM):
    """Qwen2: the Llama layout with q/k/v bias."""

    stacked_params = _LLAMA_STACKED
    config_defaults = {"attention_bias": True}
