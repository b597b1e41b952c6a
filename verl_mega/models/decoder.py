"""Llama / Qwen2 / Qwen3 decoder built from megatron-core tensor-parallel layers; one module = one pipeline stage.

Follows transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` numerically. `DecoderModel`
composes the parts of the sibling modules: the transformer block on megatron-core TP layers and the
vocab-split embedding (`layers.py`), RoPE / M-RoPE (`rope.py`), the padding masks (`masks.py`), packed-
sequence attention (`varlen_attention.py`) and the Qwen2.5-VL vision tower (`vision.py`). TP enters only
through the `tp_group` handed to the layers; which layers a stage owns and which groups it uses is
decided in `parallelize.py`.

Speed (generation): a KV-cache forward under no_grad on CUDA takes the layers' fused path (`fused_ops.py`,
see `layers.py`; `fused_inference = False` keeps the plain torch ops); the boolean mask is turned into an
additive bias once per forward, not once per layer; each layer's last residual add runs inside the next norm's
kernel (`DecoderLayer.forward_fused`).

Deliberate choices:
- Megatron's weight initialisation is never used (it needs megatron's global state/CUDA RNG tracker
  on GPU). `init_weights(seed)` instead draws every *full* tensor from a generator seeded by
  (seed, HF name) and keeps this rank's slice, so a random model is identical across (tp, pp).
- Vocabulary is padded (see `ModelConfig.padded_vocab_size`); padded embedding/head rows are zero.
- Training passes may pack several sequences into one row (`cu_seqlens`): attention then goes through
  `varlen_attention.py` and no FLOP is spent on padding; the padded path (attention_mask) stays.
- Sequence parallelism (Megatron, tp > 1; `sequence_parallel`, set by `parallelize.apply_sequence_parallel`):
  the sequence is padded to a multiple of tp and sharded after the embedding; the layers do the gather /
  reduce-scatter (see `layers.py`).
- Activation recompute is a per-layer switch that `parallelize.apply_recompute` sets; the model never
  reads a config.
- Tied embeddings with the head on another stage: the last stage holds its own copy (Megatron
  style); both copies carry `shared_embedding = True` and the training engine keeps them in sync.
"""

from __future__ import annotations

import warnings
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # megatron warns at import that TE/Apex are absent; we use neither
    warnings.simplefilter("ignore")
    from megatron.core.model_parallel_config import ModelParallelConfig

from verl_mega.models import fused_ops
from verl_mega.models.config import ModelConfig
from verl_mega.models.layers import CaptureSafeVocabParallelEmbedding, DecoderLayer, column_linear, mark_tp
from verl_mega.models.masks import attention_bias, build_attention_mask
from verl_mega.models.norm import RMSNorm
from verl_mega.models.rope import RotaryEmbedding
from verl_mega.models.varlen_attention import PackedSeqs
from verl_mega.models.vision import VisionTower
from verl_mega.parallel import sequence_parallel as sp

INIT_STD = 0.02


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
            mark_tp(self.embed_tokens.weight, 0)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp, mp, tp_group, i, device) for i in range(start, end))
        self._head_is_embedding = False
        if has_head:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype, device)
            if self.is_value_model:
                self.value_head = nn.Linear(config.hidden_size, 1, bias=not score_head, dtype=params_dtype,
                                            device=device)
            else:
                self._head_is_embedding = config.tie_word_embeddings and has_embedding
                self.lm_head = column_linear(config.hidden_size, self.padded_vocab_size, False, mp, tp_group,
                                       skip_weight_param_allocation=self._head_is_embedding)
        if config.tie_word_embeddings and not self.is_value_model and has_embedding != has_head:
            (self.embed_tokens.weight if has_embedding else self.lm_head.weight).shared_embedding = True
        if not on_cpu:
            self.to(device)  # CPU-built replicated params (norms, value head) follow the CUDA ones
        for layer in self.layers:  # q/k/v and gate/up in one buffer each: one GEMM each when generating
            layer.stack_projections()
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
            mask = PackedSeqs.from_cu_seqlens(cu_seqlens, hidden.device)
        else:
            mask = build_attention_mask(attention_mask, attn_mask, position_ids.shape[-1], kv_cache is not None)
            if mask is not None:
                mask = attention_bias(mask, hidden.dtype)
        fused = (self.fused_inference and kv_cache is not None and not torch.is_grad_enabled()
                 and fused_ops.available(hidden))
        if fused:  # generation: each layer's last residual add runs inside the next norm's kernel
            delta = None
            for layer in self.layers:
                hidden, delta = layer.forward_fused(hidden, delta, cos, sin, mask, kv_cache)
            if not self.has_head:
                return hidden if delta is None else hidden + delta
            hidden = self.norm.fused_add(hidden, delta)[0]
        else:
            for layer in self.layers:
                hidden = layer(hidden, cos, sin, mask, kv_cache, sp_group=sp_group)
            if not self.has_head:
                return hidden
            hidden = self.norm(hidden, sp_group=sp_group)
        if sp_group is not None:  # what follows (head, log-prob kernel) gives every rank the full gradient
            hidden = sp.gather_from_sequence(hidden, sp_group, grad_replicated=True)[:, :seq]
        if self.value_head is not None:
            return self.value_head(hidden).squeeze(-1).float()  # [batch, seq]
        if return_hidden:
            return hidden
        return self.lm_head(hidden, weight=self.output_weight() if self._head_is_embedding else None)[0]
