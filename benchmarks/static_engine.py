"""The previous, static generation engine: the baseline of benchmarks/generation.py and rollout_service.py
(moved out of the library: verl_mega's engine is rollout/engine.py, continuous batching + paged KV cache).

Batched autoregressive generation with a static KV cache and CUDA-graph decode steps.

What: `StaticGenerationEngine(model, tp_group, ...)` runs a one-stage `DecoderModel` (embedding and
head on this rank, layers tensor-parallel over `tp_group`) and generates responses for a list
of token-id prompts: left-padded prefill, then one decode step per new token with a
`StaticKVCache`, sampling (`sampling.py`), per-row stop on EOS / stop ids / max_new_tokens
(finished rows keep producing pad; the loop leaves early once every row is done), n samples
per prompt (rows ordered prompt-major).

Speed: decode steps have static shapes (the batch rounded up to a bucket, the attended cache
length rounded up to `kv_len_bucket` slots), so on CUDA each (batch bucket, length bucket) pair is
captured once in a `torch.cuda.CUDAGraph` and replayed; sampling and stop bookkeeping stay eager
(small, sync-free kernels). The host checks "all rows done" only every `sync_every` steps, and
never when no stop token can end a row early (ignore_eos without stop ids). Model forwards with the
cache run under no_grad, so the decoder takes its fused path on CUDA (`models/fused_ops.py`:
about 15 kernels per layer and decode step instead of about 45; GQA attention without K/V copies).

Reference: the static-cache + CUDA-graph design of gpt-fast / vLLM's decode graphs; the output
layout follows verl's rollout DataProto (prompts, responses, response_mask, input_ids,
attention_mask, position_ids, rollout log-probs).

Simplifications: one pipeline stage only; no continuous batching or paged cache (a chunk of up to
`max_batch` rows runs until all its rows are done); prefill is not graphed.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from verl_mega.models.masks import position_ids_from_mask
from verl_mega.rollout.engine import batch_bucket
from verl_mega.rollout.output import GenerationOutput, assemble_output
from verl_mega.rollout.sampling import SamplingParams, gather_vocab_logits, sample_tokens


class StaticKVCache:
    """Preallocated KV cache implementing the model's `kv_cache.update(layer_idx, k, v)` contract:
    [max_batch, Hkv, max_seq_len, D] per layer, left-padded rows writing at a common slot."""

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


class StaticGenerationEngine:
    """Generate with a one-stage decoder model; see the module docstring.

    model: `DecoderModel` with embedding and head (`forward(ids, position_ids, attn_mask=...,
    kv_cache=..., return_hidden=True)` -> final-normed hidden [B, S, H]; `output_weight()` -> local
    LM-head shard [V_pad / tp, H]; `true_vocab_size`; `config.num_layers`).
    tp_group: the model's tensor-parallel group (None = single rank). Every rank of it must call
    `generate` with the same arguments (same tokens come out everywhere).
    max_batch: most rows decoded together (larger requests run in chunks); max_seq_len: most cache
    slots per row (prompt + new tokens). use_cuda_graph: None = on for CUDA models, off on CPU.
    kv_len_bucket: decode attends over the used cache slots rounded up to this multiple.
    compile_decode: run the decode forward through `torch.compile` (fuses the many small
    elementwise kernels of a decode step; one compilation per (batch bucket, kv_len bucket), so
    prefer a larger kv_len_bucket). Opt-in: compilation takes tens of seconds per shape.
    """

    def __init__(self, model: torch.nn.Module, tp_group: dist.ProcessGroup | None = None, *,
                 max_batch: int = 64, max_seq_len: int = 2048, eos_token_ids=(), pad_token_id: int = 0,
                 use_cuda_graph: bool | None = None, kv_len_bucket: int = 64, sync_every: int | None = None,
                 prefill_tokens: int = 16384, compile_decode: bool = False):
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
        self.model = model
        self.tp_group = tp_group
        self.device = next(model.parameters()).device
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.eos_token_ids = tuple(int(t) for t in ([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids))
        self.pad_token_id = int(pad_token_id)
        self.true_vocab_size = int(model.true_vocab_size)
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        if use_cuda_graph and self.device.type != "cuda":
            raise ValueError("use_cuda_graph=True needs a model on a CUDA device")
        self.use_cuda_graph = use_cuda_graph
        self.kv_len_bucket = kv_len_bucket
        self.sync_every = sync_every or (16 if self.device.type == "cuda" else 1)
        self.prefill_tokens = prefill_tokens
        self.cache = StaticKVCache(model.config.num_layers, max_batch, max_seq_len, self.device)
        dev = self.device
        # static decode inputs/outputs (CUDA graphs read and write these exact tensors)
        self._tokens = torch.full((max_batch, 1), self.pad_token_id, dtype=torch.long, device=dev)
        self._positions = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)
        self._slot_mask = torch.zeros(max_batch, max_seq_len, dtype=torch.bool, device=dev)
        self._write_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._logits = torch.zeros(max_batch, self.true_vocab_size, dtype=torch.float32, device=dev)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._graph_weights: tuple[int, ...] = ()  # parameter addresses the captured graphs read
        self._model_step = torch.compile(self._model_step_eager) if compile_decode else self._model_step_eager

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, n: int = 1, stop_token_ids=(), seed: int = 0,
                 ignore_eos: bool = False) -> GenerationOutput:
        """Generate n responses per prompt; see `GenerationOutput` for the returned layout.

        prompt_ids: list of B non-empty token-id lists. Stops a row at the first token in
        eos_token_ids (unless ignore_eos) or stop_token_ids, or after max_new_tokens tokens.
        seed: seeds the sampling generator (same seed + same inputs = same tokens).
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        rows = self._check_prompts(prompt_ids, n, max_new_tokens)
        stops = set(int(t) for t in stop_token_ids) | (set() if ignore_eos else set(self.eos_token_ids))
        stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        if weights != self._graph_weights:  # re-allocated weights (e.g. resharded): graphs would read stale memory
            self._graphs.clear()
            self._graph_weights = weights
        results = []
        for start in range(0, len(rows), self.max_batch):
            results += self._generate_chunk(rows[start:start + self.max_batch], max_new_tokens, params,
                                            stop_ids, generator)
        return assemble_output(rows, results, self.pad_token_id)

    def release(self) -> None:
        """Free the KV cache and the CUDA graphs (they are rebuilt on the next `generate`)."""
        self.cache.release()
        self._graphs.clear()
        self._graph_pool = None

    # ------------------------------------------------------------------ validation / output
    def _check_prompts(self, prompt_ids, n: int, max_new_tokens: int) -> list[list[int]]:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: give at least one prompt")
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                                 f"exceeds the engine's max_seq_len={self.max_seq_len}")
            bad = [t for t in p if not (0 <= int(t) < self.true_vocab_size)]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.true_vocab_size}): {bad[:5]}")
        return [[int(t) for t in p] for p in prompt_ids for _ in range(n)]  # prompt-major

    # ------------------------------------------------------------------ one chunk of rows
    def _generate_chunk(self, rows, max_new_tokens, params, stop_ids, generator):
        """Prefill + decode up to max_batch rows; returns [(response tokens, logprobs)] per row."""
        b, p_len = len(rows), max(len(r) for r in rows)
        bb = batch_bucket(b, self.max_batch) if self.use_cuda_graph else b
        logits = self._prefill(rows, p_len, bb)
        tokens = torch.full((b, max_new_tokens), self.pad_token_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=self.device)
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        alive = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=self.device)
        for t in range(max_new_tokens):
            tok, lp = sample_tokens(logits[:b], params, generator)
            tokens[:, t] = torch.where(finished, self.pad_token_id, tok)
            logprobs[:, t] = torch.where(finished, 0.0, lp)
            alive[:, t] = ~finished
            if stop_ids.numel():
                finished |= torch.isin(tok, stop_ids)
            if t == max_new_tokens - 1:
                break
            if stop_ids.numel() and (t + 1) % self.sync_every == 0 and bool(finished.all()):  # host sync
                break
            self._tokens[:b, 0] = tokens[:, t]
            self._write_pos.fill_(p_len + t)  # cache slot of the token being fed
            self._positions[:b] += 1
            logits = self._decode(bb, self._kv_len(p_len + t + 1))
        lengths = alive.sum(-1).tolist()
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        return [(tokens[i][:lengths[i]], logprobs[i][:lengths[i]]) for i in range(b)]

    def _kv_len(self, needed: int) -> int:
        """Cache slots a decode step attends over: `needed` rounded up to the bucket."""
        return min(self.max_seq_len, -(-needed // self.kv_len_bucket) * self.kv_len_bucket)

    def _prefill(self, rows: list[list[int]], p_len: int, bb: int) -> torch.Tensor:
        """Run the left-padded prompts through the model, filling cache slots [0, p_len).

        Resets the decode state of rows [0, bb) and returns the last-position logits [b, V].
        Rows are processed in slices of about `prefill_tokens` tokens to bound activation memory.
        """
        b, dev = len(rows), self.device
        ids = torch.full((b, p_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(b, p_len, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, p_len - len(r):] = torch.tensor(r)
            mask[i, p_len - len(r):] = True
        ids, mask = ids.to(dev), mask.to(dev)
        positions = position_ids_from_mask(mask)  # [b, P]
        self._slot_mask[:bb].zero_()
        self._slot_mask[:b, :p_len] = mask
        self._tokens[:bb].fill_(self.pad_token_id)
        self._positions[:bb].zero_()
        self._positions[:b, 0] = positions[:, -1]
        causal = torch.ones(p_len, p_len, dtype=torch.bool, device=dev).tril()
        diag = torch.eye(p_len, dtype=torch.bool, device=dev)
        # [b, 1, P, P]; a padding query attends to itself only (no fully masked rows -> no NaN)
        attn = causal & (mask[:, None, None, :] | diag)
        step = max(1, self.prefill_tokens // p_len)
        write_index = torch.arange(p_len, device=dev)
        for s in range(0, b, step):
            e = min(b, s + step)
            self.cache.set_view(e - s, p_len, write_index, row_start=s)
            hidden = self.model(ids[s:e], positions[s:e], attn_mask=attn[s:e], kv_cache=self.cache,
                                return_hidden=True)  # [rows, P, H]
            self._logits[s:e].copy_(self._head_logits(hidden[:, -1]))
        return self._logits

    # ------------------------------------------------------------------ decode step
    def _decode_forward(self, bb: int, kv_len: int) -> None:
        """One decode step over rows [0, bb) reading/writing only the static buffers (graph-safe).

        Idempotent for fixed buffer contents, so CUDA-graph warm-up runs change nothing.
        """
        self.cache.set_view(bb, kv_len, self._write_pos)
        self._slot_mask[:bb].index_fill_(1, self._write_pos, True)
        attn = self._slot_mask[:bb, None, None, :kv_len]  # [bb, 1, 1, kv_len]
        self._logits[:bb].copy_(self._model_step(self._tokens[:bb], self._positions[:bb], attn))

    def _model_step_eager(self, tokens: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Model forward of one decode step (cache view already set) -> full-vocab logits [bb, V]."""
        hidden = self.model(tokens, positions, attn_mask=attn, kv_cache=self.cache, return_hidden=True)  # [bb, 1, H]
        return self._head_logits(hidden[:, -1])

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed hidden states [b, H] only -> full-vocab logits [b, V] float32.

        Applying the head to the last position alone (not the model's [b, S, V/tp] output) keeps
        prefill memory at O(b * V) instead of O(b * S * V).
        """
        local = torch.matmul(hidden, self.model.output_weight().t())  # [b, V_pad / tp]; as megatron's column linear
        return gather_vocab_logits(local, self.tp_group, self.true_vocab_size)

    def _decode(self, bb: int, kv_len: int) -> torch.Tensor:
        """Run a decode step (graph replay when enabled) and return the logits buffer [max_batch, V]."""
        if self.use_cuda_graph:
            graph = self._graphs.get((bb, kv_len))
            if graph is None:
                graph = self._capture(bb, kv_len)
            if graph is not None:
                graph.replay()
                return self._logits
        self._decode_forward(bb, kv_len)
        return self._logits

    def _capture(self, bb: int, kv_len: int) -> torch.cuda.CUDAGraph | None:
        """Capture `_decode_forward(bb, kv_len)` in a CUDA graph; on failure warn and go eager."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: cuBLAS handles, lazy allocations (idempotent)
                    self._decode_forward(bb, kv_len)
            torch.cuda.current_stream().wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._decode_forward(bb, kv_len)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager decode
            warnings.warn(f"CUDA graph capture of the decode step failed ({exc!r}); decoding eagerly")
            self.use_cuda_graph = False
            return None
        self._graphs[(bb, kv_len)] = graph
        return graph
