"""The decoder's transformer block (Llama / Qwen2 / Qwen3) on megatron-core tensor-parallel layers.

Follows transformers' `LlamaDecoderLayer` / `Qwen2DecoderLayer` / `Qwen3DecoderLayer` numerically
(pre-norm, RMSNorm in fp32, SDPA attention with GQA, SwiGLU MLP), with the linear layers and the
embedding replaced by megatron-core's `ColumnParallelLinear` / `RowParallelLinear` /
`VocabParallelEmbedding` (Megatron-LM TP: column-split q/k/v/gate/up, row-split o/down, vocab-split
embedding and LM head). TP enters only through the `tp_group` handed to those layers. Here: the TP
linear helpers, the capture-safe embedding, `Attention` (+ its SDPA core `attend`), `MLP`, `DecoderLayer`.

Speed (generation): a KV-cache forward under no_grad on CUDA ("fused" path) calls the q/k/v and
gate/up projections without megatron's separate bias add and replaces the elementwise chains by the
one-kernel ops of `fused_ops.py` (RMSNorm with the residual add, bias + RoPE, SiLU*up); same
arithmetic, ~15 instead of ~45 kernels per layer per decode step. GQA with a mask folds the query
heads of a KV group into the query axis (no per-step copy of the cache to every query head). The
embedding masks out-of-shard ids without boolean indexing (no host sync: a TP decode step can be
captured in a CUDA graph).

Deliberate choices:
- q/k/v and gate/up are separate parameters (no fused QKV): a TP shard of each is one contiguous
  slice of the HF tensor, so shards of different TP sizes relate by plain concatenation along the
  partition dim (HybridEngine resharding, HF loading). Their data is stacked in one buffer each when
  the layer is built (`stack_projections`), so the generation path runs one GEMM for q/k/v and one for
  gate/up (as vLLM's QKVParallelLinear / MergedColumnParallelLinear) with no copy of the weights; where
  something later moves a parameter's data on its own, `stacked_rows` sees it and runs separate GEMMs.
- Megatron's weight initialisation is never used (it needs megatron's global state/CUDA RNG tracker
  on GPU): the layers are built zero-initialised and `DecoderModel.init_weights` draws the weights.
- Packed sequences (a `PackedSeqs` mask): attention goes through `varlen_attention.py` and no FLOP is
  spent on padding; the padded path (bool / additive mask) stays.
- Sequence parallelism (Megatron, tp > 1) calls the TP linears as plain local matmuls and does the
  gather / reduce-scatter itself (`parallel/sequence_parallel.py`): megatron's own `sequence_parallel=True`
  layers gather along dim 0 (sequence-first), ours are batch-first.
- Activation recompute is a per-layer switch (`recompute_full`, `recompute_core`, `recompute_act`) that
  `parallelize.apply_recompute` sets; the layers never read a config.
"""

from __future__ import annotations

import functools
import warnings

import torch
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
from verl_mega.models.rope import apply_rope
from verl_mega.models.varlen_attention import PackedSeqs, varlen_attend
from verl_mega.parallel import sequence_parallel as sp


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


def mark_tp(param: torch.Tensor | None, dim: int) -> None:
    """Set megatron's TP attributes where megatron did not (it only sets them when it initialises)."""
    if param is not None and not hasattr(param, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def column_linear(in_f: int, out_f: int, bias: bool, mp: ModelParallelConfig, tp_group, **kw) -> ColumnParallelLinear:
    """megatron ColumnParallelLinear in_f -> out_f, output split over tp_group (weight [out_f/tp, in_f],
    partition_dim 0), no gather; zero-initialised (weights are drawn by DecoderModel.init_weights). `kw`
    goes to megatron (e.g. skip_weight_param_allocation for a head tied to the embedding)."""
    layer = ColumnParallelLinear(in_f, out_f, config=mp, init_method=nn.init.zeros_, bias=bias,
                                 gather_output=False, tp_group=tp_group, **kw)
    mark_tp(layer.weight, 0)
    return layer


def row_linear(in_f: int, out_f: int, mp: ModelParallelConfig, tp_group) -> RowParallelLinear:
    """megatron RowParallelLinear in_f -> out_f without bias, input split over tp_group (weight
    [out_f, in_f/tp], partition_dim 1), output all-reduced; zero-initialised like `column_linear`."""
    layer = RowParallelLinear(in_f, out_f, config=mp, init_method=nn.init.zeros_, bias=False,
                              input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
    mark_tp(layer.weight, 1)
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
        self.q_proj = column_linear(h, config.num_heads * d, bias, mp, tp_group)
        self.k_proj = column_linear(h, config.num_kv_heads * d, bias, mp, tp_group)
        self.v_proj = column_linear(h, config.num_kv_heads * d, bias, mp, tp_group)
        self.o_proj = row_linear(config.num_heads * d, h, mp, tp_group)
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
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = stacked_rows([p.weight for p in projections])  # [(Hq + 2 Hk) * D, H] or None
        if weight is None:
            q, k, v = (F.linear(x, p.weight) for p in projections)
        else:  # one GEMM; q, k, v are column slices of its output
            q, k, v = F.linear(x, weight).split([p.weight.shape[0] for p in projections], dim=-1)
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
        q, k, v = self._qkv_fused(x, cos, sin) if fused else self.qkv(x, cos, sin, local)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_idx, q, k, v) if hasattr(kv_cache, "attend") else None
            if out is not None:  # the cache computed the attention itself (e.g. a paged-attention kernel)
                return self.o_proj(out)[0]
            k, v = kv_cache.update(self.layer_idx, k, v)  # [batch, kv_heads, seq_kv, head_dim]
        return _linear(self.o_proj, self.core(q, k, v, mask), local)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, local: bool = False):
        """x [B, S, H] -> q [B, heads, S, D], k / v [B, kv_heads, S, D] (projections, qk-norm, RoPE on q and k)."""
        q = apply_rope(self._heads(self.q_proj, x, self.num_heads, self.q_norm, local), cos, sin)
        k = apply_rope(self._heads(self.k_proj, x, self.num_kv_heads, self.k_norm, local), cos, sin)
        return q, k, self._heads(self.v_proj, x, self.num_kv_heads, None, local)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """The attention core (no projections): q [B, heads, S, D], k / v [B, kv_heads, S_kv, D], `mask` as
        in `forward` -> [B, S, heads * D]; recomputed in backward under selective recompute."""
        if isinstance(mask, PackedSeqs):
            core = functools.partial(varlen_attend, seqs=mask, kernel=self.varlen_kernel)
        else:
            core = functools.partial(attend, mask=mask)
        if self.recompute_core and torch.is_grad_enabled():  # keep q, k, v; recompute the core in backward
            return checkpoint(core, q, k, v, use_reentrant=False)
        return core(q, k, v)


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
        self.gate_proj = column_linear(config.hidden_size, config.intermediate_size, False, mp, tp_group)
        self.up_proj = column_linear(config.hidden_size, config.intermediate_size, False, mp, tp_group)
        self.down_proj = row_linear(config.intermediate_size, config.hidden_size, mp, tp_group)
        self.recompute_act = False  # selective recompute of silu(gate) * up (set by parallelize.apply_recompute)

    def forward(self, x: torch.Tensor, fused: bool = False, local: bool = False) -> torch.Tensor:
        """local: as in Attention.forward (plain matmuls, partial-sum output)."""
        if fused:  # column-parallel forward = local matmul (one GEMM when stacked); one kernel for silu * up
            weight = stacked_rows([self.gate_proj.weight, self.up_proj.weight])  # [2 I, H] or None
            if weight is None:
                gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
            else:
                gate, up = F.linear(x, weight).chunk(2, dim=-1)
            return self.down_proj(fused_ops.silu_mul(gate, up))[0]
        gate, up = _linear(self.gate_proj, x, local), _linear(self.up_proj, x, local)
        if self.recompute_act and torch.is_grad_enabled():  # keep gate/up; recompute silu(gate) * up in backward
            return _linear(self.down_proj, checkpoint(_swiglu, gate, up, use_reentrant=False), local)
        return _linear(self.down_proj, _swiglu(gate, up), local)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _batch_and_seq_dynamic(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, their dims 0 and 1 (batch, sequence) marked symbolic for torch.compile from the first call
    (no static graph first, then a dynamic one)."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)
    return tensors


def _linear(layer: nn.Module, x: torch.Tensor, local: bool) -> torch.Tensor:
    """A megatron TP linear's forward, or with `local` just x @ W_shard^T (+ its bias shard): no TP
    communication (a row-parallel output is then this rank's partial sum)."""
    if local:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)[0]


def stack_rows_(params: list[torch.Tensor]) -> None:
    """Move the data of `params` (same dtype, device and trailing dims) into one new buffer, in order, each
    parameter a view of its rows, so `stacked_rows` can run them as one GEMM. Values are unchanged. Call it
    only where the parameters are built: whatever re-points a parameter's data later (a flat optimizer buffer,
    resharding, offload) keeps the parameters correct and `stacked_rows` falls back to separate GEMMs."""
    with torch.no_grad():
        buffer = torch.cat([p.data for p in params], dim=0)  # [sum of rows, ...]
    start = 0
    for p in params:
        p.data = buffer[start:start + p.shape[0]]
        start += p.shape[0]


def stacked_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one [sum of rows, ...] tensor without a copy (no autograd) if they are consecutive
    contiguous rows of one storage (as `stack_rows_` leaves them, or a flat buffer that holds them in order);
    otherwise None. Checked on every call: it follows wherever the parameters' data lives now."""
    first = tensors[0]
    end = first.data_ptr()
    for t in tensors:
        if (t.data_ptr() != end or not t.is_contiguous() or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        end += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


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
        self.compiled = None  # torch.compile'd (_pre_attention, _post_attention) (parallelize.apply_compile)

    def projection_groups(self) -> list[list[torch.Tensor]]:
        """The weights the generation path runs as one GEMM when stacked: [q, k, v] and [gate, up]."""
        attn, mlp = self.self_attn, self.mlp
        return [[attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                [mlp.gate_proj.weight, mlp.up_proj.weight]]

    def stack_projections(self) -> None:
        """Put each of `projection_groups` in one buffer (`stack_rows_`), so the generation path runs one GEMM for
        q/k/v and one for gate/up. The model calls it when built."""
        for group in self.projection_groups():
            stack_rows_(group)

    def forward(self, x, cos, sin, mask, kv_cache=None, sp_group=None) -> torch.Tensor:
        """sp_group: sequence parallel over this TP group (x [B, S/tp, H] a sequence shard; see _forward_sp).
        The generation path (fused_ops kernels) is `forward_fused`."""
        if sp_group is not None:
            step = functools.partial(self._forward_sp, sp_group=sp_group)
        else:
            step = self._forward_compiled if self.compiled is not None and kv_cache is None else self._forward
        if self.recompute_full and kv_cache is None and torch.is_grad_enabled():
            return checkpoint(step, x, cos, sin, mask, use_reentrant=False)
        return step(x, cos, sin, mask, kv_cache)

    def forward_fused(self, x, delta, cos, sin, mask, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """The generation path (fused_ops kernels, no autograd) with the residual adds inside the norms' kernels:
        the layer's input is x + delta (delta None: x), x / delta [B, S, H]; returns (x', delta') whose sum is
        the layer's output (the next layer's input norm, or the final norm, adds them)."""
        h, x = self.input_layernorm.fused_add(x, delta)  # x <- x + delta, h = norm(x): one kernel
        attn = self.self_attn(h, cos, sin, mask, kv_cache, fused=True)
        h, x = self.post_attention_layernorm.fused_add(x, attn)
        return x, self.mlp(h, fused=True)

    def _forward(self, x, cos, sin, mask, kv_cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_compiled(self, x, cos, sin, mask, kv_cache=None) -> torch.Tensor:
        """`_forward` with the parts before and after the attention core compiled and the core run eagerly:
        the compiled graphs see only tensors, never the mask object (a `PackedSeqs` in a compiled frame
        made dynamo guard on its sequence count and recompile for every new count of sequences per row).
        Batch and sequence sizes are marked dynamic up front, so each compiled part holds one graph per model
        shape and grad mode: dynamo's limit of 8 per code object (shared by all layers and every model in the
        process: actor, reference, critic) is not reached by static-then-dynamic pairs."""
        pre_attention, post_attention = self.compiled
        q, k, v = pre_attention(*_batch_and_seq_dynamic(x, cos, sin))
        return post_attention(*_batch_and_seq_dynamic(x, self.self_attn.core(q, k, v, mask)))

    def _pre_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Input norm, q/k/v projections, RoPE: x [B, S, H] -> q, k, v [B, heads, S, D]."""
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def _post_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, post-attention norm, MLP, residual: x [B, S, H], attn [B, S, heads*D]."""
        x = x + self.self_attn.o_proj(attn)[0]
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_sp(self, x, cos, sin, mask, kv_cache=None, *, sp_group) -> torch.Tensor:
        """Megatron sequence parallelism: norms and residuals on the shard x [B, S/tp, H]; all-gather
        before each TP block, reduce-scatter its partial output back to shards."""
        h = sp.gather_from_sequence(self.input_layernorm(x, sp_group=sp_group), sp_group)  # [batch, seq, hidden]
        x = x + sp.reduce_scatter_to_sequence(self.self_attn(h, cos, sin, mask, kv_cache, local=True), sp_group)
        h = sp.gather_from_sequence(self.post_attention_layernorm(x, sp_group=sp_group), sp_group)
        return x + sp.reduce_scatter_to_sequence(self.mlp(h, local=True), sp_group)  # [batch, seq/tp, hidden]
