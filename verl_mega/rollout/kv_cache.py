"""The paged key/value cache of the continuous-batching generation engine (the old engine's static
cache lives with that engine in benchmarks/static_engine.py, the baseline of the rollout benchmarks).

`PagedKVCache` (vLLM's PagedAttention layout, gather flavour): per layer one pool of
`num_blocks * block_size` token slots [slots, Hkv_local, head_dim]; a sequence owns a block table
(list of block ids, `BlockAllocator`), so its token at position p sits in slot
`table[p // block_size] * block_size + p % block_size` and memory follows the actual lengths.
Blocks are reference-counted: the n samples of a prompt share its full blocks (prefix sharing).
Block 0 is never handed out: padding rows and padding tokens write into it and nobody reads it
unmasked. Attention reads a sequence's blocks by gathering its slots into a dense
[B, Hkv, kv_len, D] view (`update`) that SDPA consumes with a mask: simple, correct on every
device, graph-capturable (fixed shapes for a fixed (rows, kv_len)); the gather costs one extra
read + write of the attended K/V per layer versus a fused paged-attention kernel.
"""

from __future__ import annotations

import torch

from verl_mega.rollout.paged_attention import paged_decode_attention, paged_write, pool_addresses  # Triton loads on use


class BlockAllocator:
    """Free list + reference counts of the blocks 1 .. num_blocks-1 (block 0 is the padding block)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks (reference count 1), or None if fewer are free (nothing allocated)."""
        if count > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(count)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more owner for each of `blocks`."""
        for b in blocks:
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one owner of each block; blocks without owners return to the free list."""
        for b in blocks:
            self._refs[b] -= 1
            assert self._refs[b] >= 0, f"block {b} freed more often than owned"
            if self._refs[b] == 0:
                self._free.append(b)


class PagedKVCache:
    """Paged KV cache implementing the model's `kv_cache.update(layer_idx, k, v)` contract.

    `set_view(write_slots, read_slots)` before a forward: write_slots [B * S_new] int64 (the slot of
    every new token, row-major; padding tokens -> slot 0), read_slots [B, kv_len] int64 (the slots
    each row attends over, in position order). Pools are allocated lazily at the first `update`
    with the keys' head count, head size and dtype; `addresses` [layers, 2] int64 on the device holds their
    data pointers (K, V) and outlives them: the paged decode kernels read the pools through it, so CUDA
    graphs of paged decode steps survive `release` (`paged_attention.py`, "Pools by address").
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, device: torch.device | str):
        if num_layers < 1 or num_blocks < 2 or block_size < 1:
            raise ValueError(f"num_layers >= 1, num_blocks >= 2 and block_size >= 1 needed, got "
                             f"{num_layers}, {num_blocks}, {block_size}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.device = torch.device(device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.write_slots: torch.Tensor | None = None
        self.read_slots: torch.Tensor | None = None
        self.tables: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.addresses = torch.zeros(num_layers, 2, dtype=torch.int64, device=self.device)

    def set_view(self, write_slots: torch.Tensor, read_slots: torch.Tensor | None,
                 tables: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Choose where the next forward writes and what it reads (see the class docstring). For a decode
        step read by the paged kernel instead: read_slots None, tables [B, nb] block ids and positions [B]
        (the new token's position; it attends over positions 0 .. positions[b])."""
        self.write_slots, self.read_slots, self.tables, self.positions = write_slots, read_slots, tables, positions

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """The decoder's attention hook: with a paged decode view (`set_view(..., tables, positions)`), write
        k, v [B, Hkv, 1, D] and return the attention output [B, 1, Hq * D] of q [B, Hq, 1, D] computed
        by the Triton kernel on the blocks (`paged_attention.py`); otherwise None (the decoder then calls
        `update` and SDPA)."""
        if self.tables is None:
            return None
        if self.keys[layer_idx] is None:
            raise RuntimeError("a paged decode step needs the KV pools: prefill allocates them")
        k_pool, v_pool = self.keys[layer_idx], self.values[layer_idx]
        paged_write(k[:, :, 0], v[:, :, 0], self.write_slots, k_pool, v_pool, self.addresses, layer_idx)
        b, hq, _, d = q.shape
        out = paged_decode_attention(q[:, :, 0], k_pool, v_pool, self.tables, self.positions, self.block_size,
                                     self.addresses, layer_idx)  # [B, Hq, D]
        return out.reshape(b, 1, hq * d)

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b, hkv, s, d = k.shape
        if self.keys[layer_idx] is None:
            shape = (self.num_blocks * self.block_size, hkv, d)  # [slots, Hkv, D]
            # zeros, not empty: masked slots are still multiplied by 0 probabilities; NaN garbage would poison them
            self.keys[layer_idx] = torch.zeros(shape, dtype=k.dtype, device=self.device)
            self.values[layer_idx] = torch.zeros(shape, dtype=k.dtype, device=self.device)
            self.addresses[layer_idx] = pool_addresses(self.keys[layer_idx], self.values[layer_idx])[0]
        k_pool, v_pool = self.keys[layer_idx], self.values[layer_idx]
        assert self.write_slots.shape[0] == b * s, (tuple(k.shape), tuple(self.write_slots.shape))
        k_pool.index_copy_(0, self.write_slots, k.transpose(1, 2).reshape(b * s, hkv, d).to(k_pool.dtype))
        v_pool.index_copy_(0, self.write_slots, v.transpose(1, 2).reshape(b * s, hkv, d).to(v_pool.dtype))

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, S_new, D] (after RoPE) at the write slots; return the gathered
        (k_all, v_all) [B, Hkv, kv_len, D] of the read slots (including the ones just written)."""
        self._write(layer_idx, k, v)
        k_pool, v_pool = self.keys[layer_idx], self.values[layer_idx]
        # [B, kv_len, Hkv, D] -> [B, Hkv, kv_len, D]
        return k_pool[self.read_slots].transpose(1, 2), v_pool[self.read_slots].transpose(1, 2)

    @torch.no_grad()
    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s slots into block `dst` in every layer (copy-on-write of a shared partial block)."""
        bs = self.block_size
        for pool in self.keys + self.values:
            if pool is not None:
                pool[dst * bs:(dst + 1) * bs].copy_(pool[src * bs:(src + 1) * bs])

    def memory_bytes(self) -> int:
        """Bytes held by the allocated pools."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def release(self) -> None:
        """Drop the pools (e.g. before the HybridEngine switches back to training); `addresses` stays (rewritten
        when the pools are allocated again)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
