"""Static (preallocated) key/value cache for batched generation.

What: per layer, one key and one value buffer [max_batch, Hkv_local, max_seq_len, head_dim],
allocated once (lazily, at the first `update`, with the shape and dtype of the keys the model
produces) and reused by every later generation until `release()`.

Prompts are left-padded to a common length, so all rows of a batch write their next key/value at
the same cache slot; the slot indices live in a device tensor (`write_index`) and are written with
`index_copy_`, so a decode step has fixed shapes and no host sync and can be captured in a CUDA
graph. `set_view(batch, kv_len, write_index)` chooses which rows are active and how many slots
the attention reads (the engine buckets kv_len so decode does not attend over all of
max_seq_len while the sequences are still short).

Simplifications: no paged blocks (rows cannot be evicted or refilled mid-generation); every row
reserves max_seq_len slots.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Preallocated KV cache implementing the model's `kv_cache.update(layer_idx, k, v)` contract."""

    def __init__(self, num_layers: int, max_batch: int, max_seq_len: int, device: torch.device | str):
        if num_layers < 1 or max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"num_layers, max_batch and max_seq_len must be >= 1, got "
                             f"{num_layers}, {max_batch}, {max_seq_len}")
        self.num_layers = num_layers
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.row_start, self.batch = 0, max_batch
        self.kv_len = max_seq_len
        self.write_index: torch.Tensor | None = None

    def set_view(self, batch: int, kv_len: int, write_index: torch.Tensor, row_start: int = 0) -> None:
        """Activate rows [row_start, row_start + batch), attend over slots [0, kv_len), write at `write_index`.

        write_index: [S_new] int64 device tensor of the slots the next `update` writes (all rows
        alike). Its *contents* may change between CUDA-graph replays; the tensor must not.
        """
        if batch < 1 or row_start < 0 or row_start + batch > self.max_batch:
            raise ValueError(f"rows [{row_start}, {row_start + batch}) are outside [0, max_batch={self.max_batch})")
        if not (1 <= kv_len <= self.max_seq_len):
            raise ValueError(f"kv_len {kv_len} is outside [1, max_seq_len={self.max_seq_len}]")
        self.row_start, self.batch, self.kv_len, self.write_index = row_start, batch, kv_len, write_index

    def _allocate(self, layer_idx: int, k: torch.Tensor) -> None:
        shape = (self.max_batch, k.shape[1], self.max_seq_len, k.shape[3])  # [B, Hkv, S_max, D]
        # zeros, not empty: unwritten slots are masked out, but NaN garbage would poison softmax
        self.keys[layer_idx] = torch.zeros(shape, dtype=k.dtype, device=self.device)
        self.values[layer_idx] = torch.zeros(shape, dtype=k.dtype, device=self.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values and return everything the attention should read.

        k, v: [batch, Hkv_local, S_new, head_dim] (after RoPE), S_new == len(write_index).
        Returns (k_all, v_all): [batch, Hkv_local, kv_len, head_dim] views into the cache.
        """
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, k)
        rows = slice(self.row_start, self.row_start + self.batch)
        k_cache, v_cache = self.keys[layer_idx][rows], self.values[layer_idx][rows]
        assert k.dim() == 4 and k.shape[0] == self.batch and k.shape[2] == self.write_index.shape[0], \
            (tuple(k.shape), self.batch, tuple(self.write_index.shape))
        k_cache.index_copy_(2, self.write_index, k.to(k_cache.dtype))
        v_cache.index_copy_(2, self.write_index, v.to(v_cache.dtype))
        return k_cache[:, :, : self.kv_len], v_cache[:, :, : self.kv_len]

    def memory_bytes(self) -> int:
        """Bytes held by the allocated buffers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def release(self) -> None:
        """Drop the buffers (e.g. before the HybridEngine switches back to training)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
