"""The KV pool: the only owner of KV memory.

One tensor holds every layer's keys and values, addressed by slot index:
    buffer[layer, 0 = key / 1 = value, slot, kv_head, head_dim]
A slot is one token's place (page size 1, LightLLM's "token attention"). One spare slot past
`num_slots` is never allocated: padding tokens (slot -1, from CUDA-graph padding) write there.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_slots = num_slots
        self.num_layers = num_layers
        # [num_layers, 2, num_slots + 1 (spare for padding writes), num_kv_heads, head_dim]
        self.buffer = torch.zeros(num_layers, 2, num_slots + 1, num_kv_heads, head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_slots + 1, num_kv_heads, head_dim]."""
        return self.buffer[layer_id, 0], self.buffer[layer_id, 1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k_cache, v_cache) of every layer, in order."""
        return [self.layer(i) for i in range(self.num_layers)]
