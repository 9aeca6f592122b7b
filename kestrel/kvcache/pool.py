"""The KV pool: the only owner of KV memory.

One tensor holds every layer's keys and values, addressed by slot index:
    kv[layer, 0 = key / 1 = value, slot, kv_head, head_dim]
A slot is one token's place (page size 1, LightLLM's "token attention").
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_slots = num_slots
        # [num_layers, 2, num_slots, num_kv_heads, head_dim]
        self.kv = torch.zeros(num_layers, 2, num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_slots, num_kv_heads, head_dim]."""
        return self.kv[layer_id, 0], self.kv[layer_id, 1]
