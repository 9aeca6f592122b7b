"""Tensor-parallel-ready building blocks of the models (linear, embedding, norm, RoPE)."""
