"""Attention backends, chosen once at start-up by name: `create_backend("torch", ...)`.

Each backend prepares typed metadata for a step once, then runs each layer's attention
(`backend.py` has the interface). `torch` is the reference (CPU and any device); `triton` runs the
GPU kernels of `kestrel/kernels/` and supports CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable

from kestrel.attention.backend import AttentionBackend, AttentionContext, BatchLayout

__all__ = ["AttentionBackend", "AttentionContext", "BatchLayout", "BACKENDS", "create_backend"]


def _torch(**kwargs) -> AttentionBackend:
    from kestrel.attention.torch_backend import TorchAttentionBackend

    kwargs.pop("max_num_seqs", None)
    return TorchAttentionBackend(**kwargs)


def _triton(**kwargs) -> AttentionBackend:
    from kestrel.attention.triton_backend import TritonAttentionBackend  # imports triton: only when asked for

    return TritonAttentionBackend(**kwargs)


BACKENDS: dict[str, Callable[..., AttentionBackend]] = {"torch": _torch, "triton": _triton}
"""Backend name -> factory taking the keyword arguments of `create_backend`."""


def create_backend(name: str, *, num_heads: int, num_kv_heads: int, head_dim: int, max_model_len: int,
                   device, max_num_seqs: int = 256) -> AttentionBackend:
    """The attention backend `name` for a model of this shape on `device`."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not known; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          max_model_len=max_model_len, device=device, max_num_seqs=max_num_seqs)
