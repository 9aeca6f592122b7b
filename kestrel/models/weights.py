"""Name-mapped weight loading: checkpoint tensors (Hugging Face names) into a model's parameters.

A checkpoint name maps to our parameter of the same name, except for fragments listed as
`StackedParam`s, which several checkpoint tensors share (q_proj, k_proj and v_proj all go into
qkv_proj, each as one shard). A parameter with a `weight_loader` takes its tensor-parallel share
itself; others are copied whole. Every parameter (and every shard of a merged one) must be set,
or loading fails naming what is missing.

`load_named_int4` maps the same names for a checkpoint's int4 codes (`--cpu-quantized-decode`): each
goes to the module owning the target parameter (its `load_int4`), shard and all.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import NamedTuple

import torch
from torch import nn

_IGNORED_FRAGMENTS = ("rotary_emb.inv_freq",)
"""Checkpoint buffers we recompute."""


class StackedParam(NamedTuple):
    checkpoint_fragment: str
    """e.g. ".q_proj"."""
    our_fragment: str
    """e.g. ".qkv_proj"."""
    shard_id: str | int
    """Which part of our parameter the tensor is ("q", "k", "v"; 0, 1)."""


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       stacked: Collection[StackedParam], skip: Collection[str] = ()) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[tuple[str, object]] = set()
    for name, tensor in weights:
        if name in skip or any(f in name for f in _IGNORED_FRAGMENTS):
            continue
        target, shard = _target(name, stacked)
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            _copy_plain(param, tensor)
        elif shard is None:
            loader(param, tensor.to(param.dtype))
        else:
            loader(param, tensor.to(param.dtype), shard)
        loaded.add((target, shard))
    _check_all_loaded(params, loaded, stacked, skip)


def load_named_int4(model: nn.Module, weights: Iterable[tuple[str, object]],
                    stacked: Collection[StackedParam]) -> int:
    """Hand each (checkpoint name, Int4Weight) to `load_int4` of the module owning its parameter.

    Names without a module that takes int4 weights (norms, the embedding lookup) are skipped;
    returns how many were taken.
    """
    taken = 0
    for name, weight in weights:
        target, shard = _target(name, stacked)
        module_name, _, kind = target.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"checkpoint tensor {name!r} has no matching module in {type(model).__name__}") from None
        if kind != "weight" or not hasattr(module, "load_int4"):
            continue
        module.load_int4(weight, shard)
        taken += 1
    return taken


def _target(name: str, stacked: Collection[StackedParam]) -> tuple[str, str | int | None]:
    """Our parameter's name for a checkpoint name, and the shard of it the tensor fills (None: all)."""
    for ckpt_part, our_part, shard_id in stacked:
        if ckpt_part in name:
            return name.replace(ckpt_part, our_part), shard_id
    return name, None


def _check_all_loaded(params: dict[str, nn.Parameter], loaded: set[tuple[str, object]],
                      stacked: Collection[StackedParam], skip: Collection[str]) -> None:
    got = {name for name, _ in loaded}
    missing = [n for n in params if n not in got and n not in skip]
    shards_of: dict[str, list[object]] = {}
    for _, our_part, shard_id in stacked:
        shards_of.setdefault(our_part, []).append(shard_id)
    for name in got:
        for our_part, shard_ids in shards_of.items():
            if f"{our_part}." in name and any((name, s) not in loaded for s in shard_ids):
                missing.append(name)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:5]}")


def _copy_plain(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(tensor)
