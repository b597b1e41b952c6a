"""The simplest KV cache honouring the decoder's protocol (for tests): concatenate per layer."""

import torch


class ListCache:
    """`update(layer_idx, k, v)` appends k/v [B, Hkv, S_new, D] along the sequence dim and returns
    the full keys/values so far."""

    def __init__(self):
        self.kv = {}

    def update(self, layer_idx, k, v):
        if layer_idx in self.kv:
            k = torch.cat([self.kv[layer_idx][0], k], dim=2)
            v = torch.cat([self.kv[layer_idx][1], v], dim=2)
        self.kv[layer_idx] = (k, v)
        return k, v
