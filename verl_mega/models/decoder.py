"""Llama / Qwen2 / Qwen3 decoder built from megatron-core tensor-parallel layers; one module = one pipeline stage.

Follows transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` numerically
(RMSNorm in fp32, RoPE cos/sin computed in fp32, SDPA attention, SwiGLU MLP), with the linear layers
and the embedding replaced by megatron-core's `ColumnParallelLinear` / `RowParallelLinear` /
`VocabParallelEmbedding` (Megatron-LM TP: column-split q/k/v/gate/up, row-split o/down, vocab-split
embedding and LM head). TP enters only through the `tp_group` handed to those layers; which layers a
stage owns and which groups it uses is decided in `parallelize.py`.

Speed (generation): a KV-cache forward under no_grad on CUDA ("fused" path) calls the q/k/v and
gate/up projections without megatron's separate bias add and replaces the elementwise chains by the
one-kernel ops of `fused_ops.py` (RMSNorm with the residual add, bias + RoPE, SiLU*up); same
arithmetic, ~15 instead of ~45 kernels per layer per decode step. GQA with a mask folds the query
heads of a KV group into the query axis (no per-step copy of the cache to every query head); the
boolean mask is turned into an additive bias once per forward, not once per layer. The embedding
masks out-of-shard ids without boolean indexing (no host sync: a TP decode step can be captured in a
CUDA graph).

Deliberate choices:
- q/k/v and gate/up are separate parameters (no fused QKV): a TP shard of each is one contiguous
  slice of the HF tensor, so shards of different TP sizes relate by plain concatenation along the
  partition dim (HybridEngine resharding, HF loading).
- Megatron's weight initialisation is never used (it needs megatron's global state/CUDA RNG tracker
  on GPU). `init_weights(seed)` instead draws every *full* tensor from a generator seeded by
  (seed, HF name) and keeps this rank's slice, so a random model is identical across (tp, pp).
- Vocabulary is padded (see `ModelConfig.padded_vocab_size`); padded embedding/head rows are zero.
- Training passes may pack several sequences into one row (`cu_seqlens`): attention then goes through
  `varlen_attention.py` and no FLOP is spent on padding; the padded path (attention_mask) stays.
- Sequence parallelism (Megatron, tp > 1; `sequence_parallel`, set by `parallelize.apply_sequence_parallel`)
  calls the TP linears as plain local matmuls and does the gather / reduce-scatter itself
  (`parallel/sequence_parallel.py`): megatron's own `sequence_parallel=True` layers gather along dim 0
  (sequence-first), ours are batch-first.
- Activation recompute is a per-layer switch (`recompute_full`, `recompute_core`, `recompute_act`) that
  `parallelize.apply_recompute` sets; the model never reads a config.
- Tied embeddings with the head on another stage: the last stage holds its own copy (Megatron
  style); both copies carry `shared_embedding = True` and the training engine keeps them in sync.
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

with warnings.catch_warnings():  # megatron warns at import that TE/Apex are absent; we use neither
    warnings.simplefilter("ignore")
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, set_tensor_model_parallel_attributes)
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from verl_mega.models import fused_ops
from verl_mega.models.config import ModelConfig
from verl_mega.models.norm import RMSNorm
from verl_mega.models.varlen_attention import PackedSeqs, varlen_attend
from verl_mega.models.vision import VisionTower
from verl_mega.parallel import sequence_parallel as sp

INIT_STD = 0.02


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2] (fp32) for rope_theta and the optional llama3/linear scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given position ids. inv_freq is kept out of the buffers so `.to(bf16)` never rounds it.

    M-RoPE (config.mrope_section = (a, b, c), Qwen2-VL): positions [3, B, S] (t, h, w axes); the first a
    frequencies rotate by the t position, the next b by h, the last c by w (transformers'
    `apply_multimodal_rotary_pos_emb`). [B, S] positions are used on all three axes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self._inv_freq = rope_inv_freq(config)
        self._axis = None  # M-RoPE: which position axis (0, 1, 2) drives each frequency [head_dim/2]
        if config.mrope_section is not None:
            self._axis = torch.repeat_interleave(torch.arange(3), torch.tensor(config.mrope_section))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] (or [3, B, S] with M-RoPE) -> (cos, sin), each [B, S, head_dim] in `dtype`."""
        if self._inv_freq.device != position_ids.device:  # moved once, not per call (CUDA-graph capture)
            self._inv_freq = self._inv_freq.to(position_ids.device)
            self._axis = None if self._axis is None else self._axis.to(position_ids.device)
        if position_ids.dim() == 3 and self._axis is None:
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} (3 axes) need an M-RoPE model "
                             f"(config.mrope_section); this model takes [B, S]")
        if position_ids.dim() == 2:  # plain RoPE, or M-RoPE with the three axes equal (text)
            freqs = position_ids[..., None].float() * self._inv_freq  # [B, S, head_dim/2]
        else:
            # [B, S, head_dim/2]: frequency j rotates by the position on axis _axis[j]
            freqs = position_ids.permute(1, 2, 0)[..., self._axis].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, S, head_dim] by cos/sin [B, S, head_dim] (rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CaptureSafeVocabParallelEmbedding(VocabParallelEmbedding):
    """megatron's VocabParallelEmbedding (same parameter, same all-reduce over tp_group) whose TP>1
    forward masks out-of-shard ids with clamp/masked_fill instead of boolean-mask indexing, which
    syncs with the host and so cannot be captured in a CUDA graph. Same values and gradients."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size() == 1 or self.reduce_scatter_embeddings:
            return super().forward(input_)
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)  # [batch, seq]
        local = (input_ - self.vocab_start_index).clamp(0, self.weight.shape[0] - 1)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # [batch, seq, hidden]
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


def _mark_tp(param: torch.Tensor | None, dim: int) -> None:
    """Set megatron's TP attributes where megatron did not (it only sets them when it initialises)."""
    if param is not None and not hasattr(param, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _column(in_f: int, out_f: int, bias: bool, mp: ModelParallelConfig, tp_group, **kw) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(in_f, out_f, config=mp, init_method=nn.init.zeros_, bias=bias,
                                 gather_output=False, tp_group=tp_group, **kw)
    _mark_tp(layer.weight, 0)
    return layer


def _row(in_f: int, out_f: int, mp: ModelParallelConfig, tp_group) -> RowParallelLinear:
    layer = RowParallelLinear(in_f, out_f, config=mp, init_method=nn.init.zeros_, bias=False,
                              input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
    _mark_tp(layer.weight, 1)
    return layer


class Attention(nn.Module):
    """GQA self-attention over this rank's heads (num_heads/tp query heads, num_kv_heads/tp kv heads)."""

    def __init__(self, config: ModelConfig, tp: int, mp: ModelParallelConfig, tp_group, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // tp
        self.num_kv_heads = config.num_kv_heads // tp
        h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = _column(h, config.num_heads * d, bias, mp, tp_group)
        self.k_proj = _column(h, config.num_kv_heads * d, bias, mp, tp_group)
        self.v_proj = _column(h, config.num_kv_heads * d, bias, mp, tp_group)
        self.o_proj = _row(config.num_heads * d, h, mp, tp_group)
        self.q_norm = self.k_norm = None
        self.varlen_kernel = "auto"  # packed-sequence attention kernel (see varlen_attention.py)
        self.recompute_core = False  # selective recompute of the attention core (set by parallelize.apply_recompute)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, mp.params_dtype, device)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, mp.params_dtype, device)

    def _heads(self, proj: nn.Module, x: torch.Tensor, n: int, norm: RMSNorm | None, local: bool) -> torch.Tensor:
        b, s, _ = x.shape
        y = _linear(proj, x, local).view(b, s, n, self.head_dim)  # [batch, seq, heads, head_dim]
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)  # [batch, heads, seq, head_dim]

    def _qkv_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v [B, heads, S, D] via fused_ops: projections without the separate bias add, then one
        bias + RoPE kernel (the column-parallel forward is a plain local matmul: no gather_output)."""
        b, s, _ = x.shape
        # [batch, seq, heads*head_dim] each
        q, k, v = (F.linear(x, p.weight) for p in (self.q_proj, self.k_proj, self.v_proj))
        biases = (self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
        if self.q_norm is not None:  # Qwen3: per-head norm between the bias and RoPE
            if biases[0] is not None:
                q, k, v = q + biases[0], k + biases[1], v + biases[2]
                biases = (None, None, None)
            q = self.q_norm(q.view(b, s, self.num_heads, self.head_dim), fused=True).view(b, s, -1)
            k = self.k_norm(k.view(b, s, self.num_kv_heads, self.head_dim), fused=True).view(b, s, -1)
        q, k, v = fused_ops.rope_qkv_(q, k, v, cos, sin, *biases)  # [batch, seq, heads, head_dim]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, seq, head_dim]

    def forward(self, x, cos, sin, mask, kv_cache=None, fused: bool = False, local: bool = False) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]; mask: bool [B, 1, S, S_kv] (True = attend) or additive float
        (see `attention_bias`), None for plain causal, or `PackedSeqs` for packed sequences (B = 1,
        attention confined to each sequence). fused: take the fused_ops path (no autograd). local: plain
        local matmuls without megatron's TP communication, the output being this rank's partial sum
        (sequence parallelism does the gather / reduce-scatter around the block)."""
        if fused:
            q, k, v = self._qkv_fused(x, cos, sin)
        else:
            q = apply_rope(self._heads(self.q_proj, x, self.num_heads, self.q_norm, local), cos, sin)
            k = apply_rope(self._heads(self.k_proj, x, self.num_kv_heads, self.k_norm, local), cos, sin)
            v = self._heads(self.v_proj, x, self.num_kv_heads, None, local)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_idx, q, k, v) if hasattr(kv_cache, "attend") else None
            if out is not None:  # the cache computed the attention itself (e.g. a paged-attention kernel)
                return self.o_proj(out)[0]
            k, v = kv_cache.update(self.layer_idx, k, v)  # [batch, kv_heads, seq_kv, head_dim]
        if isinstance(mask, PackedSeqs):
            core = lambda q, k, v: varlen_attend(q, k, v, mask, self.varlen_kernel)  # noqa: E731
        else:
            core = lambda q, k, v: attend(q, k, v, mask)  # noqa: E731
        if self.recompute_core and torch.is_grad_enabled():  # keep q, k, v; recompute the core in backward
            return _linear(self.o_proj, checkpoint(core, q, k, v, use_reentrant=False), local)
        return _linear(self.o_proj, core(q, k, v), local)


FOLD_MAX_QUERIES = 16  # fold query heads into the query axis only for this many positions or fewer


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with grouped-query heads: q [B, Hq, S, D], k/v [B, Hkv, S_kv, D] -> [B, S, Hq*D].

    Query head h reads KV head h // (Hq/Hkv), as transformers' repeat_kv. For a few query positions
    with a mask [B, 1, S, S_kv] (decode steps) the Hq/Hkv query heads of a group are folded into the
    query axis (q -> [B, Hkv, rep*S, D], the mask tiled to match) so SDPA reads each KV head once and
    no K/V copy is made. For long queries (training, log-probs, prefill) tiling the mask would cost
    rep x S x S_kv per layer, so K/V are expanded instead. Without a mask SDPA's enable_gqa.
    """
    b, hq, s, d = q.shape
    hkv, s_kv = k.shape[1], k.shape[2]
    rep = hq // hkv
    if mask is None:
        causal = s > 1 and s_kv == s
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=rep > 1)  # [B, heads, seq, D]
    elif rep == 1 or mask.shape[1] != 1 or s > FOLD_MAX_QUERIES:
        if rep > 1:  # per-head masks: expand K/V instead
            k, v = (t[:, :, None].expand(b, hkv, rep, s_kv, d).reshape(b, hq, s_kv, d) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        # [batch, kv_heads, rep*seq, head_dim]: row r*S + i of group g = query head g*rep + r at position i
        qf = q.reshape(b, hkv, rep * s, d)
        mf = mask[:, :, None].expand(mask.shape[0], 1, rep, s, s_kv).reshape(mask.shape[0], 1, rep * s, s_kv)
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf).reshape(b, hq, s, d)  # [B, heads, seq, D]
    return out.transpose(1, 2).reshape(b, s, hq * d)  # [batch, seq, heads*head_dim]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate/up column-split, down row-split."""

    def __init__(self, config: ModelConfig, mp: ModelParallelConfig, tp_group):
        super().__init__()
        self.gate_proj = _column(config.hidden_size, config.intermediate_size, False, mp, tp_group)
        self.up_proj = _column(config.hidden_size, config.intermediate_size, False, mp, tp_group)
        self.down_proj = _row(config.intermediate_size, config.hidden_size, mp, tp_group)
        self.recompute_act = False  # selective recompute of silu(gate) * up (set by parallelize.apply_recompute)

    def forward(self, x: torch.Tensor, fused: bool = False, local: bool = False) -> torch.Tensor:
        """local: as in Attention.forward (plain matmuls, partial-sum output)."""
        if fused:  # column-parallel forward = local matmul; one kernel for silu * up
            act = fused_ops.silu_mul(F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight))
            return self.down_proj(act)[0]
        gate, up = _linear(self.gate_proj, x, local), _linear(self.up_proj, x, local)
        if self.recompute_act and torch.is_grad_enabled():  # keep gate/up; recompute silu(gate) * up in backward
            return _linear(self.down_proj, checkpoint(_swiglu, gate, up, use_reentrant=False), local)
        return _linear(self.down_proj, _swiglu(gate, up), local)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _linear(layer: nn.Module, x: torch.Tensor, local: bool) -> torch.Tensor:
    """A megatron TP linear's forward, or with `local` just x @ W_shard^T (+ its bias shard): no TP
    communication (a row-parallel output is then this rank's partial sum)."""
    if local:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)[0]


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; `layer_idx` is the global layer index (the key of the KV cache)."""

    def __init__(self, config: ModelConfig, tp: int, mp: ModelParallelConfig, tp_group, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, mp.params_dtype, device)
        self.self_attn = Attention(config, tp, mp, tp_group, layer_idx, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, mp.params_dtype, device)
        self.mlp = MLP(config, mp, tp_group)
        self.recompute_full = False  # keep only the layer input; recompute the layer in backward (apply_recompute)

    def forward(self, x, cos, sin, mask, kv_cache=None, fused: bool = False, sp_group=None) -> torch.Tensor:
        """sp_group: sequence parallel over this TP group (x [B, S/tp, H] a sequence shard; see _forward_sp)."""
        if not fused:
            step = self._forward if sp_group is None else functools.partial(self._forward_sp, sp_group=sp_group)
            if self.recompute_full and kv_cache is None and torch.is_grad_enabled():
                return checkpoint(step, x, cos, sin, mask, use_reentrant=False)
            return step(x, cos, sin, mask, kv_cache)
        attn = self.self_attn(self.input_layernorm(x, fused=True), cos, sin, mask, kv_cache, fused=True)
        post = self.post_attention_layernorm
        h, x = fused_ops.rms_norm(attn, post.weight, post.eps, residual=x)  # x <- x + attn, h = norm(x): one kernel
        return x + self.mlp(h, fused=True)

    def _forward(self, x, cos, sin, mask, kv_cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_sp(self, x, cos, sin, mask, kv_cache=None, *, sp_group) -> torch.Tensor:
        """Megatron sequence parallelism: norms and residuals on the shard x [B, S/tp, H]; all-gather
        before each TP block, reduce-scatter its partial output back to shards."""
        h = sp.gather_from_sequence(self.input_layernorm(x, sp_group=sp_group), sp_group)  # [batch, seq, hidden]
        x = x + sp.reduce_scatter_to_sequence(self.self_attn(h, cos, sin, mask, kv_cache, local=True), sp_group)
        h = sp.gather_from_sequence(self.post_attention_layernorm(x, sp_group=sp_group), sp_group)
        return x + sp.reduce_scatter_to_sequence(self.mlp(h, local=True), sp_group)  # [batch, seq/tp, hidden]


def _pad_for_shards(input_ids, position_ids, attention_mask, cu_seqlens, tp: int):
    """Pad the sequence dim (1) to a multiple of tp for sequence parallelism: ids / positions with 0, the
    padding mask with 0 (masked keys), packed sequences with one extra pseudo-sequence of the pad tokens."""
    pad = -position_ids.shape[-1] % tp
    if pad == 0:
        return input_ids, position_ids, attention_mask, cu_seqlens
    widen = lambda t: None if t is None else F.pad(t, (0, pad))  # noqa: E731
    if cu_seqlens is not None:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + pad])
    return widen(input_ids), widen(position_ids), widen(attention_mask), cu_seqlens


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] (long) for a 1/0 padding mask [B, S]: 0 at the first real token, as transformers
    does for left padding; pad positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(attention_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                         q_len: int, has_cache: bool) -> torch.Tensor | None:
    """Boolean mask [B, 1, S_q, S_kv] (True = attend) or None (plain causal, no padding).

    `attention_mask` [B, S_kv] is a 1/0 padding mask over all keys (cache + new tokens); the new
    queries are its last `q_len` positions and attend causally. An explicit `attn_mask` is used as is.
    Query rows that attend to nothing (pad positions) are opened to every key so SDPA yields finite
    garbage instead of NaN; such rows are never read.
    """
    if attn_mask is not None:
        mask = attn_mask.bool()
    elif attention_mask is not None:
        kv_len = attention_mask.shape[-1]
        rows = torch.arange(q_len, device=attention_mask.device)[:, None] + (kv_len - q_len)
        causal = torch.arange(kv_len, device=attention_mask.device)[None, :] <= rows  # [S_q, S_kv]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [batch, 1, S_q, S_kv]
    else:
        if has_cache and q_len > 1:
            raise ValueError("with a kv_cache and more than one new token, pass attention_mask or attn_mask")
        return None
    return mask | ~mask.any(dim=-1, keepdim=True)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> additive mask of `dtype` (0 / -inf), what SDPA adds to the scores.

    SDPA converts a bool mask itself, but per call; the decoder converts once per forward."""
    return torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)


class DecoderModel(nn.Module):
    """One pipeline stage of the decoder: optional embedding, layers [layer_range), optional norm + head.

    Parameter names follow HF without the "model." prefix and with stage-local layer numbers
    (`hf_name()` maps them). TP-sharded parameters carry megatron's `tensor_model_parallel`,
    `partition_dim` (0 for q/k/v/gate/up/embedding/lm_head, 1 for o/down) and `partition_stride`;
    replicated ones (norms, value head) do not.

    Attributes: `config`, `tp`, `tp_rank`, `layer_range`, `has_embedding`, `has_head`, `value_head`
    (nn.Linear(H, 1) on the last stage of a value model, else None), `is_value_model` (every stage),
    `is_score_model` (every stage: the head is a score head, see `score_head`),
    `padded_vocab_size`, `true_vocab_size`, `vocab_start_index`.
    """

    def __init__(self, config: ModelConfig, tp_group: dist.ProcessGroup, *, layer_range: tuple[int, int],
                 has_embedding: bool, has_head: bool, value_head: bool = False, score_head: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None, init_seed: int | None = 0):
        """`init_seed`: draw random weights (see init_weights); None leaves them uninitialised (to be loaded).
        `device`: None/CPU allocates on CPU; a CUDA device allocates on the current CUDA device.
        `value_head`: a critic's head, nn.Linear(H, 1) with bias (HF `*ForTokenClassification`, one label).
        `score_head`: a reward model's head, nn.Linear(H, 1) without bias (HF `*ForSequenceClassification`,
        one label); like the value head it outputs [B, S] and is named `score` in HF checkpoints."""
        super().__init__()
        if value_head and score_head:
            raise ValueError("value_head and score_head are exclusive: a critic has a value head, "
                             "a reward model a score head")
        self.tp = tp_group.size()
        self.tp_rank = tp_group.rank()
        config.check_tp(self.tp)
        start, end = layer_range
        if not 0 <= start <= end <= config.num_layers:
            raise ValueError(f"layer_range {layer_range} is outside [0, {config.num_layers}]")
        device = torch.device(device) if device is not None else torch.device("cpu")
        on_cpu = device.type == "cpu"
        mp = ModelParallelConfig(tensor_model_parallel_size=self.tp, use_cpu_initialization=on_cpu,
                                 perform_initialization=False, params_dtype=params_dtype)
        self.config, self.tp_group = config, tp_group
        self.layer_range, self.has_embedding, self.has_head = (start, end), has_embedding, has_head
        self.is_value_model = value_head or score_head  # on every stage (the head itself only on the last)
        self.is_score_model = score_head
        self.padded_vocab_size = config.padded_vocab_size(self.tp)
        self.true_vocab_size = config.vocab_size
        self.vocab_start_index = self.tp_rank * (self.padded_vocab_size // self.tp)
        self.rotary = RotaryEmbedding(config)
        self.fused_inference = True  # KV-cache forwards under no_grad take the fused_ops path where available
        self.sequence_parallel = False  # Megatron sequence parallelism for tp > 1 (parallelize.build_stage sets it)
        self.embed_tokens = self.norm = self.lm_head = self.value_head = self.visual = None
        if has_embedding and config.is_vlm:  # replicated on every TP rank: see vision.py
            self.visual = VisionTower(config.vision, params_dtype, device)
        if has_embedding:
            self.embed_tokens = CaptureSafeVocabParallelEmbedding(self.padded_vocab_size, config.hidden_size,
                                                       init_method=nn.init.zeros_, config=mp, tp_group=tp_group)
            _mark_tp(self.embed_tokens.weight, 0)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp, mp, tp_group, i, device) for i in range(start, end))
        self._head_is_embedding = False
        if has_head:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype, device)
            if self.is_value_model:
                self.value_head = nn.Linear(config.hidden_size, 1, bias=not score_head, dtype=params_dtype,
                                            device=device)
            else:
                self._head_is_embedding = config.tie_word_embeddings and has_embedding
                self.lm_head = _column(config.hidden_size, self.padded_vocab_size, False, mp, tp_group,
                                       skip_weight_param_allocation=self._head_is_embedding)
        if config.tie_word_embeddings and not self.is_value_model and has_embedding != has_head:
            (self.embed_tokens.weight if has_embedding else self.lm_head.weight).shared_embedding = True
        if not on_cpu:
            self.to(device)  # CPU-built replicated params (norms, value head) follow the CUDA ones
        if init_seed is not None:
            self.init_weights(init_seed)
        elif self.value_head is not None:
            self.init_weights(0, only=("value_head.",))

    # ------------------------------------------------------------------ naming / weights
    def hf_name(self, name: str) -> str:
        """HF checkpoint name of a local parameter name (global layer index, "model." prefix; value head = "score";
        the vision tower keeps its name `visual.*`)."""
        if name.startswith("visual."):
            return name
        if name.startswith("layers."):
            idx, rest = name[len("layers."):].split(".", 1)
            return f"model.layers.{int(idx) + self.layer_range[0]}.{rest}"
        if name.startswith("lm_head."):
            return name
        if name.startswith("value_head."):
            return "score." + name[len("value_head."):]
        return "model." + name

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """Shape of the unsharded tensor a (possibly TP-sharded) parameter is a slice of (vocab padded)."""
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= self.tp
        return tuple(shape)

    def shard_slice(self, param: torch.Tensor) -> tuple[slice, ...]:
        """Index of this rank's shard inside the full (padded) tensor."""
        index = [slice(None)] * param.dim()
        if getattr(param, "tensor_model_parallel", False):
            d = param.partition_dim
            index[d] = slice(self.tp_rank * param.shape[d], (self.tp_rank + 1) * param.shape[d])
        return tuple(index)

    def is_vocab_param(self, name: str) -> bool:
        """True for the parameters whose dim 0 is the (padded) vocabulary."""
        return name in ("embed_tokens.weight", "lm_head.weight")

    @torch.no_grad()
    def init_weights(self, seed: int = 0, only: tuple[str, ...] | None = None) -> None:
        """Random weights identical for every (tp, pp): each full tensor is drawn from a CPU generator
        seeded by (seed, HF name) and this rank keeps its slice. Norm weights 1; others N(0, 0.02);
        padded vocab rows 0. `only`: restrict to local names with these prefixes."""
        norms = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for name, param in self.named_parameters():
            if only is not None and not name.startswith(only):
                continue
            if id(param) in norms:
                param.fill_(1.0)
                continue
            hf = self.hf_name(name)
            if self.config.tie_word_embeddings and hf == "lm_head.weight":
                hf = "model.embed_tokens.weight"  # the head copy on the last stage equals the embedding
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(hf.encode()))
            full = torch.randn(self.full_shape(param), generator=gen) * INIT_STD
            if self.is_vocab_param(name):
                full[self.true_vocab_size:] = 0.0
            param.copy_(full[self.shard_slice(param)])

    def output_weight(self) -> torch.Tensor:
        """Local LM-head weight shard [V_pad/tp, H] (the embedding weight when tied on a single stage)."""
        if self.lm_head is None:
            raise ValueError("output_weight(): this stage has no LM head (not the last stage, or a value model)")
        return self.embed_tokens.weight if self._head_is_embedding else self.lm_head.weight

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Image embeddings [N_tokens, H] (one per image placeholder token, in order) of pixel_values
        [N_patches, C*T*P*P] and image_grid_thw [N_images, 3] (see vision.VisionTower.forward)."""
        if self.visual is None:
            raise ValueError("encode_images(): this stage has no vision tower (not a VLM, or not the first stage)")
        return self.visual(pixel_values, image_grid_thw)

    def _embed(self, input_ids: torch.Tensor, pixel_values, image_grid_thw, image_embeds) -> torch.Tensor:
        """Token embeddings [B, S, H]; with images, the image placeholder positions (row-major) take the
        image embeddings (`image_embeds` or the tower's encoding of pixel_values)."""
        hidden = self.embed_tokens(input_ids)  # [batch, seq, hidden]
        if pixel_values is None and image_embeds is None:
            return hidden
        if self.visual is None:
            raise ValueError("pixel_values / image_embeds given to a model without a vision tower")
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass either pixel_values (+ image_grid_thw) or image_embeds, not both")
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values, image_grid_thw)
        slots = input_ids == self.config.image_token_id  # [batch, seq]
        n = int(slots.sum())
        if n != image_embeds.shape[0]:
            raise ValueError(f"input_ids hold {n} image tokens (id {self.config.image_token_id}) but there are "
                             f"{image_embeds.shape[0]} image embedding rows")
        return hidden.masked_scatter(slots.unsqueeze(-1), image_embeds.to(hidden.dtype))

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, attn_mask: torch.Tensor | None = None, kv_cache=None, return_hidden: bool = False,
                cu_seqlens: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage.

        inputs: input_ids [B, S] (long) on the first stage, hidden states [B, S, H] on the others.
        position_ids: [B, S] (see `position_ids_from_mask` for left padding); for an M-RoPE model (VLM)
            [3, B, S] (see `mrope.mrope_position_ids`) or [B, S] for text (all three axes equal).
        pixel_values [N_patches, C*T*P*P] + image_grid_thw [N_images, 3], or image_embeds [N_tokens, H]
            (VLM): on the first stage the embeddings of the positions where inputs == config.image_token_id
            (row-major) are replaced by the image embeddings (ValueError if the counts differ); later
            stages ignore them. Without them image tokens embed as ordinary tokens (decode steps).
        attention_mask: [B, S_kv] 1/0 padding mask (left padding fine), combined with causal masking;
            S_kv = cached + new tokens. Or `attn_mask`: explicit bool [B, 1, S, S_kv], True = attend.
            Neither: plain causal attention.
        cu_seqlens: packed sequences instead of padding: inputs [1, T] / [1, T, H] hold N sequences
            back to back, cu_seqlens [N + 1] (int) their offsets (0, l_0, l_0 + l_1, ..., T), position_ids
            [1, T] restarting at 0 per sequence; attention stays inside each sequence (varlen kernel,
            see varlen_attention.py). Excludes attention_mask / attn_mask / kv_cache.
        kv_cache: object owned by the caller with `update(layer_idx, k, v) -> (k_all, v_all)`: k, v are
            this step's keys/values [B, num_kv_heads/tp, S, head_dim] after RoPE, `layer_idx` the
            global layer index; it returns the keys/values to attend over [B, num_kv_heads/tp, S_kv, head_dim].
            Optionally `attend(layer_idx, q, k, v) -> [B, S, heads/tp * head_dim] | None`: a cache that
            computes the attention itself (stores k, v; q [B, heads/tp, S, head_dim]); None = use update + SDPA.
            Under no_grad with Triton available (CUDA) a cache forward takes the fused_ops path
            (set `fused_inference = False` to keep the plain torch ops).
        Sequence parallel (`sequence_parallel`, tp > 1, no kv_cache): S is padded to S' (a multiple of tp)
        and a non-last stage returns / a later stage receives this rank's shard [B, S'/tp, H].
        Returns: non-last stage: hidden [B, S, H]. Last stage: this rank's vocab shard of the logits
            [B, S, V_pad/tp] (params dtype; padded columns included — slice with vocab_start_index /
            true_vocab_size), or the final-normed hidden [B, S, H] if return_hidden, or values [B, S]
            (fp32) for a value model.
        """
        seq = position_ids.shape[-1]
        sp_group = self.tp_group if self.sequence_parallel and self.tp > 1 and kv_cache is None else None
        if sp_group is not None:  # pad the sequence to a multiple of tp (dropped again at the head)
            ids, position_ids, attention_mask, cu_seqlens = _pad_for_shards(
                inputs if self.has_embedding else None, position_ids, attention_mask, cu_seqlens, self.tp)
            inputs = ids if self.has_embedding else inputs  # later stages receive padded shards already
        # later stages ignore the images: their hidden states carry them already
        hidden = self._embed(inputs, pixel_values, image_grid_thw, image_embeds) if self.has_embedding else inputs
        if sp_group is not None and self.has_embedding:
            hidden = sp.scatter_to_sequence(hidden, sp_group)  # [batch, seq/tp, hidden]
        cos, sin = self.rotary(position_ids, hidden.dtype)
        if cu_seqlens is not None:
            if attention_mask is not None or attn_mask is not None or kv_cache is not None or hidden.shape[0] != 1:
                raise ValueError("cu_seqlens (packed sequences) needs inputs of batch 1 and no attention_mask, "
                                 "attn_mask or kv_cache")
            mask = PackedSeqs.from_cu_seqlens(cu_seqlens)
        else:
            mask = build_attention_mask(attention_mask, attn_mask, position_ids.shape[-1], kv_cache is not None)
            if mask is not None:
                mask = attention_bias(mask, hidden.dtype)
        fused = (self.fused_inference and kv_cache is not None and not torch.is_grad_enabled()
                 and fused_ops.available(hidden))
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, kv_cache, fused=fused, sp_group=sp_group)
        if not self.has_head:
            return hidden
        hidden = self.norm(hidden, fused=fused, sp_group=sp_group)
        if sp_group is not None:  # what follows (head, log-prob kernel) gives every rank the full gradient
            hidden = sp.gather_from_sequence(hidden, sp_group, grad_replicated=True)[:, :seq]
        if self.value_head is not None:
            return self.value_head(hidden).squeeze(-1).float()  # [batch, seq]
        if return_hidden:
            return hidden
        return self.lm_head(hidden, weight=self.output_weight() if self._head_is_embedding else None)[0]
