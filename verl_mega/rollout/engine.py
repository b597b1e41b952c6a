"""Continuous-batching generation over a paged KV cache, with CUDA-graph decode steps.

What: `GenerationEngine(model, tp_group, EngineConfig(...))` serves requests on a one-stage
`DecoderModel` (embedding and head on this rank, layers tensor-parallel over `tp_group`):

    rid = engine.add_request(prompt_ids, RequestParams(sampling, max_new_tokens=128, n=4))
    while engine.has_unfinished():
        for done in engine.step():          # Finished(request_id, sample_index, token_ids, logprobs)
            ...                             # as each sequence completes
    engine.append(rid, tool_result_ids)     # a paused (keep_cache=True) sequence resumes after them
    engine.add_request(prompt_ids, params, eos_at=[17, 40, 5, 9])  # forced lengths (benchmarks, see below)
    out = engine.generate(prompts, max_new_tokens=..., n=...)   # the batch convenience: GenerationOutput
    rid = engine.add_request(prompt_ids, params, pixel_values=pv, image_grid_thw=thw)   # a VLM prompt with images

A `step()` admits waiting requests (FIFO, within `max_batch` rows and the KV-cache token budget
`max_tokens`), prefills them (a prompt's n samples prefill it once and share its blocks,
`scheduler.py`), then launches `sync_every` decode steps over all running rows and reports the rows
that finished in the window before (see "look-ahead window" below): sequences join the batch as others
leave, so decode steps do not run on dead rows and the cache holds only actual lengths
(`kv_cache.PagedKVCache`).

Decode step shapes: rows rounded up to a bucket (1, 2, 4, 8, then multiples of `graph_batch_step`); the gather
attention path also rounds the attended length up to `kv_len_bucket` tokens (the paged kernel follows each row's
own length, so its steps take the whole block table). On CUDA the steps are replayed from
`torch.cuda.CUDAGraph`s that read the block tables, positions and tokens from static buffers and derive
the write/read slots and the mask on the device; each step is a graph and sampling runs eager after it.
With the paged kernel the graphs reach the KV pools through the cache's address table, so `release()`
(the KV cache freed for training between rollouts) keeps them: a rollout captures only the shapes
no earlier rollout ran.
Where every running row samples alike with the fused sampler (greedy or plain temperature, the RL case),
`cuda_graph_window` (off by default) makes a whole window of `sync_every` steps, their sampling
included, one graph: the host launches once per window, the seeds of the window's draws are drawn
beforehand into a static buffer (both paths draw them so, and give the same tokens). The host reads the
sampled tokens once per window.

Look-ahead window: a `step()` launches the next decode window before it reads the one launched by the
previous `step()` (a pinned host copy and a CUDA event per window), so the host's bookkeeping (accepting
tokens, freeing and admitting rows, staging the next inputs) runs while the device decodes. A row continues
from the window in flight on the device (its fed token is what that window's last step sampled; the host
counts the window's `pending` tokens in its position and block reservation). The price: a row that ends in
one window is decoded through the next as well (its tokens there are dropped; `Sequence.epoch` tells a
window's rows that have left the batch since its launch), about sync_every row-steps per response.
`EngineConfig.look_ahead=False` reads each window right after launching it.

Every rank of `tp_group` must make the same calls: the sampled tokens are identical on all of them
(`sampling.py`), so their schedules are too.

Images (vision-language models, `images.py`): a request's images are checked and given their M-RoPE positions
when it is added (host only), and encoded at admission: one vision-tower call over the images of the requests
in each prefill forward (about prefill_tokens tokens, so the tower's batch is bounded too; never again for its
n samples, nor for a recomputed sample). Its prefill overwrites the image-pad positions with those embeddings and takes 3-axis M-RoPE positions; its
decode steps take (sequence index + the prompt's M-RoPE delta), kept in a static [B] buffer beside the
positions (graph-capturable). The model's image / video pad tokens are never sampled (their logits are
set to -inf before sampling, so the reported log-probs are those of the distribution without them): a
generated pad token would be taken for an image slot by every later forward.

Forced lengths (`eos_at`, for benchmarks with random weights, which never sample EOS themselves):
sample j of a request emits the engine's first EOS id as its response token number `eos_at[j]` (1-based,
so its response has exactly that many tokens unless max_new_tokens ends it first), with the log-prob
of EOS under its logits; everything else (admission, freeing the row, the slot taken by a waiting
request) is the real engine: the same work as a model that stops there. `force_tokens(rid, j, ids)` scripts
a whole turn the same way (e.g. a tool call for an agent-loop benchmark): sample j's next response tokens
are `ids`, each with its log-prob under the logits.

Reference: vLLM (Kwon et al., SOSP 2023: PagedAttention, continuous batching, prefix sharing,
recompute preemption); gpt-fast's static-shape graphed decode.

Simplifications: prefill and decode run as separate forwards (no chunked prefill mixed into decode
steps); decode attention either reads the blocks in place with the Triton flash-decoding kernel
(`attention="paged"`, `paged_attention.py`, the CUDA default: 2.2x the gather path's tokens/s on an H100 at
the 0.5B shape, benchmarks/results/) or gathers them into a dense view for SDPA (`"gather"`: every device,
the CPU default); sampling by one Triton pass over the logits (`sampler="fused"`, the CUDA default:
`fused_sampling.py`, 1.12x the torch sampler's tokens/s there; `"torch"`
elsewhere);
one sampling generator per engine (seeded by `seed()` / `generate(seed=)`), so a row's random draws
depend on the batch it runs in (same inputs + same seed + same config = same tokens).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from verl_mega.kernels.dispatch import use_triton
from verl_mega.rollout.engine_config import PAGED_TILE, EngineConfig
from verl_mega.rollout.images import PromptImages, encode_pending, image_token_ids
from verl_mega.rollout.kv_cache import PagedKVCache
from verl_mega.rollout.output import GenerationOutput, assemble_output
from verl_mega.rollout.sampling import SamplingParams, gather_vocab_logits, sample_tokens
from verl_mega.rollout.scheduler import Finished, RequestParams, Scheduler, Sequence


@dataclass
class _Window:
    """A launched decode window: its rows with their `Sequence.epoch` at launch, the host buffers its tokens and
    log-probs are copied to, and the event after that copy (None off CUDA, where the copy is synchronous)."""

    rows: list[tuple[Sequence, int]]
    parity: int
    done: "torch.cuda.Event | None"


def batch_bucket(batch: int, max_batch: int, step: int = EngineConfig.graph_batch_step) -> int:
    """Rows a decode step runs for `batch` live rows: 1, 2, 4, 8, then multiples of `step` (<= max_batch; default:
    EngineConfig's graph_batch_step)."""
    bucket = 1 << (batch - 1).bit_length() if batch <= 8 else -(-batch // step) * step
    return min(bucket, max_batch)


class GenerationEngine:
    """Serve generation requests with a one-stage decoder model; see the module docstring.

    model: `DecoderModel` with embedding and head (`forward(ids, position_ids, attn_mask=...,
    kv_cache=..., return_hidden=True)` -> final-normed hidden [B, S, H]; `output_weight()` -> local
    LM-head shard [V_pad / tp, H]; `true_vocab_size`; `config.num_layers`).
    tp_group: the model's tensor-parallel group (None = single rank).
    config: `EngineConfig` (sizes, sync interval, CUDA graphs, prefix sharing).
    eos_token_ids: stop tokens of every request (unless `ignore_eos`); pad_token_id: fills outputs.
    """

    def __init__(self, model: torch.nn.Module, tp_group: dist.ProcessGroup | None = None,
                 config: EngineConfig | None = None, *, eos_token_ids=(), pad_token_id: int = 0):
        config = config or EngineConfig()
        self.model, self.tp_group, self.config = model, tp_group, config
        self.device = next(model.parameters()).device
        self.max_batch, self.max_seq_len, self.block_size = config.max_batch, config.max_seq_len, config.block_size
        self.eos_token_ids = tuple(int(t) for t in ([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids))
        self.pad_token_id = int(pad_token_id)
        self.true_vocab_size = int(model.true_vocab_size)
        self.use_cuda_graph = config.cuda_graph and self.device.type == "cuda"
        # "auto": the Triton kernels on CUDA where Triton imports (the paged kernel also needs a block size dividing
        # its 64-token tile), torch ops elsewhere
        triton_runs = use_triton(next(model.parameters()))  # (on CPU only under TRITON_INTERPRET=1)
        triton_here = self.device.type == "cuda" and triton_runs
        self.attention = config.decode_attention(triton_here)
        self.sampler = config.sampler if config.sampler != "auto" else ("fused" if triton_here else "torch")
        for key, value, other in (("attention", "paged", "gather"), ("sampler", "fused", "torch")):
            if getattr(self, key) == value and not triton_runs:
                raise ValueError(f"engine config {key}={value!r} runs a Triton kernel: it needs a CUDA model "
                                 f"(or TRITON_INTERPRET=1 on CPU); use {key}={other!r}")
        if self.attention == "paged" and PAGED_TILE % config.block_size:
            raise ValueError(f"engine config attention='paged' needs a block_size dividing {PAGED_TILE}, got "
                             f"{config.block_size}; use attention='gather' or another block_size")
        self._sample_tokens = sample_tokens
        if self.sampler == "fused":
            from verl_mega.rollout.fused_sampling import sample_tokens_fused  # lazy: Triton imported on use

            self._sample_tokens = sample_tokens_fused
        self.sync_every = config.sync_every or (8 if self.device.type == "cuda" else 1)
        num_blocks = config.max_tokens // config.block_size + 1  # + the padding block 0
        # a block table covers the longest sequence plus the decode steps run past its end before the host sees
        # it end: the rest of its window and the whole look-ahead window launched before that window is read
        self.table_width = -(-(config.max_seq_len + 2 * self.sync_every) // config.block_size)
        if num_blocks - 1 < self.table_width:
            raise ValueError(f"engine max_tokens={config.max_tokens} cannot hold one sequence of max_seq_len="
                             f"{config.max_seq_len} (+{2 * self.sync_every} decode steps); raise max_tokens")
        self.cache = PagedKVCache(model.config.num_layers, num_blocks, config.block_size, self.device)
        self.scheduler = Scheduler(max_batch=config.max_batch, num_blocks=num_blocks, block_size=config.block_size,
                                   share_prefix=config.share_prefix)
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        dev, mb = self.device, config.max_batch
        # static decode inputs/outputs (CUDA graphs read and write these exact tensors)
        self._tokens = torch.zeros(mb, dtype=torch.long, device=dev)  # [B] token fed at this step
        self._positions = torch.zeros(mb, dtype=torch.long, device=dev)  # [B] its position (= its cache slot index)
        self._tables = torch.zeros(mb, self.table_width, dtype=torch.long, device=dev)  # [B, blocks] block ids
        # the decode step's logits [B, V]: with the fused sampler on one rank, a view of the LM head's own output
        # [B, V_pad] in the weights' dtype (`_head_out`; the sampler reads it in place and computes in float32, so
        # tokens and log-probs equal those of a float32 copy); float32 otherwise
        self._head_out = None
        if self.sampler == "fused" and (tp_group is None or dist.get_world_size(tp_group) == 1):
            head = model.output_weight()
            self._head_out = torch.zeros(mb, head.shape[0], dtype=head.dtype, device=dev)
            self._logits = self._head_out[:, :self.true_vocab_size]
        else:
            self._logits = torch.zeros(mb, self.true_vocab_size, dtype=torch.float32, device=dev)
        # VLM: M-RoPE delta of each row's prompt (decode rope position = position + delta); None for text models
        pads = image_token_ids(model.config)  # the placeholder ids never sampled (module docstring)
        self.is_vlm = bool(pads)
        self._deltas = torch.zeros(mb, dtype=torch.long, device=dev) if self.is_vlm else None
        self._banned, self._banned_set = torch.tensor(pads, dtype=torch.long, device=dev), frozenset(pads)
        # a decode window's inputs, staged on the host and copied once (`_launch_window`); two host buffers, as the
        # next window is staged while the last one's copy may still be queued
        cols = self.table_width + 4 + self.sync_every
        pin = dev.type == "cuda"
        self._staging = [torch.zeros(mb, cols, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._staged = torch.zeros(mb, cols, dtype=torch.long, device=dev)
        self._seeds = torch.zeros(self.sync_every, dtype=torch.long, device=dev)  # a window's sampling seeds
        self._out_tokens = torch.zeros(mb, self.sync_every, dtype=torch.long, device=dev)  # a window's samples
        self._out_logprobs = torch.zeros(mb, self.sync_every, dtype=torch.float32, device=dev)
        # their host copies, one pair per window in flight (`_read_window`)
        self._host_out = [(torch.zeros(mb, self.sync_every, dtype=torch.long, pin_memory=pin),
                           torch.zeros(mb, self.sync_every, dtype=torch.float32, pin_memory=pin)) for _ in range(2)]
        self._inflight: _Window | None = None  # the window launched and not yet read
        self._parity = 0
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._graph_weights: tuple[int, ...] = ()
        # work done (for throughput / bandwidth accounting): decode steps, rows x steps, attended
        # context tokens summed over rows and steps, prefilled tokens; CUDA graphs captured and the seconds
        # their captures took (warm-up runs included)
        self.stats = {"decode_steps": 0, "decode_rows": 0, "decode_context_tokens": 0, "prefill_tokens": 0,
                      "graph_captures": 0, "capture_seconds": 0.0}
        # (request id, sample) -> {response token number in the current turn (0-based): forced token id}
        self._forced: dict[tuple[int, int], dict[int, int]] = {}

    # ------------------------------------------------------------------ request API
    def add_request(self, prompt_ids: list[int], params: RequestParams | None = None, *,
                    ignore_eos: bool = False, eos_at: list[int] | None = None,
                    pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> int:
        """Queue a request; returns its id. Its n samples finish independently (see `step`).

        prompt_ids: non-empty token ids; params: `RequestParams` (sampling, max_new_tokens, n, extra
        stop ids, keep_cache). The engine's EOS ids are added to the stop ids unless `ignore_eos`.
        eos_at: n ints >= 1 or None: force sample j to emit EOS as its response token number eos_at[j]
        (the module docstring's "forced lengths"; the forced EOS stops it even with `ignore_eos`).
        pixel_values [N_patches, C*T*P*P] / image_grid_thw [N_images, 3]: the prompt's images (VLM only),
        checked here and encoded when the request is admitted, once for its n samples (`rollout/images.py`).
        """
        params = params or RequestParams()
        self._check_prompt(prompt_ids, params.max_new_tokens)
        images = None
        if pixel_values is not None or image_grid_thw is not None:
            if pixel_values is None or image_grid_thw is None:
                raise ValueError("pass pixel_values and image_grid_thw together (a prompt's images)")
            images = PromptImages.prepare(self.model, prompt_ids, pixel_values, image_grid_thw)
        elif self.is_vlm and any(int(t) in self._banned_set for t in prompt_ids):
            raise ValueError("the prompt has image-pad tokens but no pixel_values / image_grid_thw were given")
        eos = frozenset() if ignore_eos else frozenset(self.eos_token_ids)
        if eos_at is not None:
            eos_at = self._check_eos_at(eos_at, params.n)
            eos = eos | {self.eos_token_ids[0]}
        stops = frozenset(int(t) for t in params.stop_token_ids) | eos
        params = RequestParams(params.sampling, params.max_new_tokens, params.n, stops, params.keep_cache)
        request_id = self.scheduler.add([int(t) for t in prompt_ids], params, images)
        for j, length in enumerate(eos_at or ()):
            self._forced[(request_id, j)] = {length - 1: self.eos_token_ids[0]}
        return request_id

    def append(self, request_id: int, token_ids: list[int], *, sample_index: int = 0,
               max_new_tokens: int | None = None) -> None:
        """Add `token_ids` (e.g. a tool result) to a paused sequence and queue it to continue generating.

        The sequence must have finished with `keep_cache=True`; its cache is reused, only the new
        tokens (and its last sampled token) are prefilled. The next `Finished` holds the tokens
        generated after `token_ids` (at most `max_new_tokens`, default the request's)."""
        seq = self.scheduler.paused.get((request_id, sample_index))
        if self.is_vlm and any(int(t) in self._banned_set for t in token_ids):
            raise ValueError("appended tokens hold image-pad tokens: images in later turns are not supported")
        if seq is not None:
            self._check_prompt(seq.tokens + list(token_ids), max_new_tokens or seq.params.max_new_tokens)
        self.scheduler.append(request_id, sample_index, token_ids, max_new_tokens)

    def force_tokens(self, request_id: int, sample_index: int, token_ids: list[int]) -> None:
        """Script a sample's next turn (benchmarks with random weights): its response tokens 1..len(token_ids)
        are `token_ids`, each with its log-prob under the model's logits (as for `eos_at`); a stop token among
        them ends the turn as a sampled one would, and tokens after the list are sampled. Call it after
        `add_request` or `append` and before the `step` that starts the turn; it holds for that turn only.
        ValueError for an empty list, an id outside the vocabulary or an image-pad token id."""
        ids = [int(t) for t in token_ids]
        if not ids or min(ids) < 0 or max(ids) >= self.true_vocab_size or self._banned_set & set(ids):
            raise ValueError(f"token_ids must be a non-empty list of token ids in [0, {self.true_vocab_size}) "
                             f"(no image pads), got {ids[:8]}")
        self._forced.setdefault((request_id, sample_index), {}).update(enumerate(ids))

    def release_request(self, request_id: int) -> None:
        """Free the kept cache of a request's paused samples."""
        self.scheduler.release(request_id)

    def has_unfinished(self) -> bool:
        """Whether requests are waiting or running."""
        return self.scheduler.has_work

    def seed(self, seed: int) -> None:
        """Re-seed the sampling generator."""
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Admit + prefill waiting requests, run `sync_every` decode steps; return the sequences that finished."""
        self._check_weights()
        sched = self.scheduler
        finished: list[Finished] = []
        admitted = sched.admit()
        if not admitted and not sched.running:
            raise RuntimeError("no request fits into the KV cache; raise max_tokens")
        if admitted:
            finished += self._prefill(admitted)
        if sched.running:
            finished += self._decode_window()
        for done in finished:  # a paused sequence resumed by `append` is not forced again
            self._forced.pop((done.request_id, done.sample_index), None)
        return finished

    # ------------------------------------------------------------------ batch convenience
    @torch.no_grad()
    def generate_rows(self, prompt_ids: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams,
                      n: int = 1, seed: int = 0, stop_token_ids=(), ignore_eos: bool = False,
                      on_finish: Callable[[int, list[int], list[float]], None] | None = None,
                      eos_at: list[int] | None = None, images: list | None = None
                      ) -> tuple[list[list[int]], list[list[float]]]:
        """n responses per prompt, prompt-major: (token ids per row, log-probs per row).

        on_finish(row, token_ids, logprobs) is called as each row finishes (row = i * n + j).
        eos_at: None or one forced response length per row (`add_request`'s eos_at, prompt-major).
        images: None or one entry per prompt: None (text) or (pixel_values, image_grid_thw) (`add_request`)."""
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: give at least one prompt")
        if images is not None and len(images) != len(prompt_ids):
            raise ValueError(f"images has {len(images)} entries for {len(prompt_ids)} prompts "
                             f"(one per prompt, None = text)")
        if eos_at is not None:  # checked before any request is queued
            eos_at = self._check_eos_at(eos_at, len(prompt_ids) * n)
        params = RequestParams(sampling, max_new_tokens, n, frozenset(int(t) for t in stop_token_ids))
        for i, p in enumerate(prompt_ids):
            try:
                self._check_prompt(p, max_new_tokens)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        if self.has_unfinished():
            raise ValueError("generate() needs an idle engine (requests are still queued or running)")
        self.seed(seed)
        first = {}
        for i, p in enumerate(prompt_ids):
            pixel_values, grid = images[i] if images is not None and images[i] is not None else (None, None)
            rid = self.add_request(p, params, ignore_eos=ignore_eos,
                                   eos_at=None if eos_at is None else eos_at[i * n:(i + 1) * n],
                                   pixel_values=pixel_values, image_grid_thw=grid)
            first[rid] = i
        results: list = [None] * (len(prompt_ids) * n)
        while self.has_unfinished():
            for done in self.step():
                row = first[done.request_id] * n + done.sample_index
                results[row] = (done.token_ids, done.logprobs)
                if on_finish is not None:
                    on_finish(row, done.token_ids, done.logprobs)
        return [r[0] for r in results], [r[1] for r in results]

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, n: int = 1, stop_token_ids=(), seed: int = 0,
                 ignore_eos: bool = False, eos_at: list[int] | None = None, images: list | None = None
                 ) -> GenerationOutput:
        """`generate_rows` returned as padded tensors (`GenerationOutput`; its position_ids are 1-axis)."""
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
        tokens, logprobs = self.generate_rows(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, n=n,
                                              seed=seed, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                              eos_at=eos_at, images=images)
        rows = [[int(t) for t in p] for p in prompt_ids for _ in range(n)]
        return assemble_output(rows, list(zip(tokens, logprobs)), self.pad_token_id)

    def release(self, graphs: bool = False) -> None:
        """Free the KV cache (re-allocated by the next prefill); drops queued and paused requests. The CUDA
        graphs stay where decode reads the cache through its address table (`attention="paged"`: the graphs
        hold the table, not the pools), unless `graphs`; the gather path's graphs read the pools and are
        always freed. Freed graphs are captured again on the next use."""
        self.cache.release()
        self._inflight = None  # (its rows are dropped with the scheduler)
        if graphs or self.attention != "paged":
            self._graphs.clear()
            self._graph_pool = None
        self._forced.clear()  # scripts of dropped requests (request ids restart with the new scheduler)
        cfg = self.config
        self.scheduler = Scheduler(max_batch=cfg.max_batch, num_blocks=self.cache.num_blocks,
                                   block_size=cfg.block_size, share_prefix=cfg.share_prefix)

    # ------------------------------------------------------------------ checks
    def _check_prompt(self, prompt_ids, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty: every prompt needs at least one token")
        if len(prompt_ids) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens with max_new_tokens={max_new_tokens} exceeds "
                             f"the engine's max_seq_len={self.max_seq_len}")
        bad = [t for t in prompt_ids if not (0 <= int(t) < self.true_vocab_size)]
        if bad:
            raise ValueError(f"the prompt has token ids outside [0, {self.true_vocab_size}): {bad[:5]}")

    def _check_eos_at(self, eos_at, n: int) -> list[int]:
        """eos_at as n ints >= 1 (ValueError naming eos_at otherwise)."""
        if not self.eos_token_ids or not 0 <= self.eos_token_ids[0] < self.true_vocab_size:
            raise ValueError(f"eos_at forces the engine's first eos_token_id, which must be a token of the "
                             f"vocabulary [0, {self.true_vocab_size}); the engine has {list(self.eos_token_ids)}")
        eos_at = [int(x) for x in eos_at]
        if len(eos_at) != n or min(eos_at) < 1:
            raise ValueError(f"eos_at must hold {n} lengths >= 1 (one per row), got {eos_at[:8]}")
        return eos_at

    def _check_weights(self) -> None:
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        if weights != self._graph_weights:  # re-allocated weights (e.g. resharded): graphs would read stale memory
            self._graphs.clear()
            self._graph_weights = weights

    # ------------------------------------------------------------------ prefill
    def _prefill(self, groups: list[list[Sequence]]) -> list[Finished]:
        """Feed each group leader's uncached tokens (slices of about prefill_tokens, each slice's pending images
        encoded in one tower call first: the tower's batch is bounded like the prefill's), fork the samples,
        sample their first token."""
        leaders = [g[0] for g in groups]
        logits = torch.empty(len(leaders), self.true_vocab_size, dtype=torch.float32, device=self.device)
        start = 0
        while start < len(leaders):  # slices of about prefill_tokens (rows x padded length)
            end, longest = start, 0
            while end < len(leaders):
                longest_next = max(longest, len(leaders[end].tokens) - leaders[end].num_cached)
                if end > start and longest_next * (end + 1 - start) > self.config.prefill_tokens:
                    break
                longest, end = longest_next, end + 1
            encode_pending(self.model, [s.images for s in leaders[start:end] if s.images is not None])
            logits[start:end] = self._prefill_forward(leaders[start:end], longest)
            self.stats["prefill_tokens"] += sum(len(s.tokens) - s.num_cached for s in leaders[start:end])
            start = end
        finished = []
        rows, row_logits = [], []
        for group, lg in zip(groups, logits):
            leader = group[0]
            leader.num_cached = len(leader.tokens)
            for src, dst in self.scheduler.fork(group):
                self.cache.copy_block(src, dst)
            rows += group
            row_logits += [lg] * len(group)
        forced = self._forced_ids(rows, 1)
        forced = None if forced is None else torch.from_numpy(forced[:, 0]).to(self.device)
        tokens, logprobs = self._sample(torch.stack(row_logits), self._sampling_groups(rows), forced)
        for seq, tok, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
            done = self.scheduler.accept(seq, [tok], [lp])
            if done is not None:
                finished.append(done)
        return finished

    def _prefill_forward(self, seqs: list[Sequence], s_new: int) -> torch.Tensor:
        """One right-padded forward over the seqs' uncached tokens -> last-position logits [rows, V]."""
        bs, dev = self.block_size, self.device
        rows = len(seqs)
        ids = torch.full((rows, s_new), self.pad_token_id, dtype=torch.long)
        starts = torch.tensor([s.num_cached for s in seqs])  # [rows]
        lengths = torch.tensor([len(s.tokens) - s.num_cached for s in seqs])  # [rows]
        nb = max(len(s.blocks) for s in seqs)
        tables = torch.zeros(rows, nb, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :lengths[r]] = torch.tensor(s.tokens[s.num_cached:])
            tables[r, :len(s.blocks)] = torch.tensor(s.blocks)
        positions = starts[:, None] + torch.arange(s_new)  # [rows, S]
        real = torch.arange(s_new)[None, :] < lengths[:, None]  # [rows, S]
        write = tables.gather(1, (positions // bs).clamp(max=nb - 1)) * bs + positions % bs
        write = torch.where(real, write, 0)  # padding tokens write into the padding block
        keys = torch.arange(nb * bs)  # [kv_len]
        read = (tables[:, :, None] * bs + torch.arange(bs)).reshape(rows, nb * bs)  # [rows, kv_len] slots
        attn = keys[None, None, :] <= positions[:, :, None]  # [rows, S, kv_len] causal over cache + new tokens
        self.cache.set_view(write.reshape(-1).to(dev), read.to(dev))
        rope, vision = self._prefill_images(seqs, positions, lengths)
        hidden = self.model(ids.to(dev), rope.to(dev), attn_mask=attn[:, None].to(dev), kv_cache=self.cache,
                            return_hidden=True, **vision)  # [rows, S, H]
        last = hidden[torch.arange(rows, device=dev), (lengths - 1).to(dev)]  # [rows, H]
        return self._head_logits(last)

    def _prefill_images(self, seqs: list[Sequence], positions: torch.Tensor, lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, dict]:
        """(rope positions, model keywords) of a prefill: positions [rows, S] as they are for text-only rows;
        with images, [3, rows, S] M-RoPE positions (text rows: 3 equal axes; padding: its index) and
        {"image_embeds": [k, H]} the embeddings of the image-pad tokens being fed, row-major."""
        if not any(s.images is not None for s in seqs):
            return positions, {}  # (a VLM's text rows: three equal axes = plain RoPE at that position)
        rope = positions[None].repeat(3, 1, 1)  # [3, rows, S]
        embeds = []
        for r, s in enumerate(seqs):
            if s.images is None:
                continue
            start, end = s.num_cached, s.num_cached + int(lengths[r])
            rope[:, r, :end - start] = s.images.rope_positions(start, end)
            embeds.append(s.images.embeds_between(start, end))
        embeds = torch.cat(embeds)
        return rope, ({"image_embeds": embeds} if len(embeds) else {})

    # ------------------------------------------------------------------ decode
    def _decode_window(self) -> list[Finished]:
        """Launch a window of `sync_every` decode steps over the running rows, then read the window the previous
        call launched (its one host sync) and return the rows it finished: the host's bookkeeping of one window
        runs while the device decodes the next (module docstring, "look-ahead window")."""
        sched, k = self.scheduler, self.sync_every
        prev, self._inflight = self._inflight, None
        if sched.running:
            sched.reserve(k)  # after each row's pending tokens; may preempt rows (their pending window goes stale)
            if sched.running:
                self._inflight = self._launch_window(list(sched.running), prev)
        finished = self._read_window(prev) if prev is not None else []
        if not self.config.look_ahead and self._inflight is not None:  # read it now: no overlap, no extra window
            finished += self._read_window(self._inflight)
            self._inflight = None
        if not sched.running:  # every row of the window in flight has left the batch: nothing of it is read
            self._inflight = None
        return finished

    def _launch_window(self, rows: list[Sequence], prev: "_Window | None") -> "_Window":
        """Stage, launch and queue the host copy of one decode window over `rows`; no host sync. A row of `prev`
        (the window in flight) continues from where that window leaves it: its fed token is the one that
        window's last step sampled, still on the device, and its position counts that window's `pending` tokens."""
        k, tw = self.sync_every, self.table_width
        b = len(rows)
        bb = batch_bucket(b, self.max_batch, self.config.graph_batch_step) if self.use_cuda_graph else b
        if self.attention == "paged":  # the kernel visits each row's own length: one graph per row bucket
            nb = self.table_width
        else:  # the gather path reads nb blocks per row: round the window's reach up to kv_len_bucket tokens
            longest = max(len(s.tokens) - 1 + s.pending + k for s in rows)  # positions the window reaches
            bucket = max(self.block_size, self.config.kv_len_bucket // self.block_size * self.block_size)
            nb = min(self.table_width, -(-longest // bucket) * bucket // self.block_size)
        source = {} if prev is None else {id(s): r for r, (s, epoch) in enumerate(prev.rows) if s.epoch == epoch}
        # the window's inputs in one host-to-device copy (pinned on CUDA, so the host does not wait for it):
        # per row [block table | token fed, its position, M-RoPE delta, row in the window in flight (-1: none) |
        # forced ids of the k steps (-1: sample)]
        self._parity ^= 1
        staging = self._staging[self._parity]
        host = staging.numpy()[:bb]
        host[:, :tw + 3] = 0  # padding rows: block 0, token 0, position 0
        host[:, tw + 3:] = -1
        for r, s in enumerate(rows):
            host[r, :len(s.blocks)] = s.blocks
            host[r, tw:tw + 4] = (s.tokens[-1], len(s.tokens) - 1 + s.pending,
                                  s.images.delta if s.images is not None else 0, source.get(id(s), -1))
        forced = self._forced_ids(rows, k)
        if forced is not None:
            host[:b, tw + 4:] = forced
        self._staged[:bb].copy_(staging[:bb], non_blocking=True)
        if source:  # continuing rows feed what their last step sampled (`_decode_steps` leaves it in _tokens)
            src = self._staged[:bb, tw + 3]
            self._staged[:bb, tw] = torch.where(src >= 0, self._tokens[src.clamp(min=0)], self._staged[:bb, tw])
        groups = self._sampling_groups(rows)
        params = self._plain_fused(groups)
        if params is not None:  # the window's sampling seeds, drawn at once (both paths below draw the same)
            torch.randint(0, 2**31 - 1, (k,), generator=self.generator, device=self.device, out=self._seeds[:k])
        context = sum(len(s.tokens) + s.pending for s in rows)  # attended tokens of the window's first step
        self.stats["decode_steps"] += k
        self.stats["decode_rows"] += b * k
        self.stats["decode_context_tokens"] += k * context + b * k * (k - 1) // 2
        if params is not None and self.config.cuda_graph_window:
            self._run_window(bb, nb, params, forced is not None)
        else:  # a graph (or an eager forward) per step, sampling eager
            self._load_window_inputs(bb)
            self._decode_steps(b, k, lambda: self._decode(bb, nb), groups, forced is not None, params is not None)
        tokens, logprobs = self._host_out[self._parity]
        tokens[:b].copy_(self._out_tokens[:b], non_blocking=True)
        logprobs[:b].copy_(self._out_logprobs[:b], non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        for s in rows:
            s.pending += k
        return _Window([(s, s.epoch) for s in rows], self._parity, done)

    def _read_window(self, window: "_Window") -> list[Finished]:
        """Wait for a launched window's host copy and give its tokens to each of its rows that has not left the
        batch since the launch (`Scheduler.accept`); returns the rows that finished."""
        if window.done is not None:
            window.done.synchronize()
        k, b = self.sync_every, len(window.rows)
        tokens, logprobs = (t[:b].tolist() for t in self._host_out[window.parity])
        finished = []
        for (seq, epoch), toks, lps in zip(window.rows, tokens, logprobs):
            if seq.epoch != epoch:  # finished (or preempted) since the launch: the window ran past its end
                continue
            seq.pending -= k
            done = self.scheduler.accept(seq, toks, lps)
            if done is not None:
                finished.append(done)
            else:
                seq.num_cached = len(seq.tokens) - 1
        return finished

    def _plain_fused(self, groups: dict[SamplingParams, torch.Tensor | None]) -> SamplingParams | None:
        """The rows' one sampling params when the fused sampler draws them with a seed per step (greedy or plain
        temperature, every row alike): such a window can run as one CUDA graph; None otherwise."""
        if self.sampler != "fused" or len(groups) != 1:
            return None
        params = next(iter(groups))
        return None if params.top_k or params.top_p < 1.0 else params

    def _load_window_inputs(self, bb: int) -> None:
        """Static decode inputs of rows [0, bb) from the staged window (`_launch_window`'s layout)."""
        staged, tw = self._staged[:bb], self.table_width
        self._tables[:bb].copy_(staged[:, :tw])
        self._tokens[:bb].copy_(staged[:, tw])
        self._positions[:bb].copy_(staged[:, tw + 1])
        if self._deltas is not None:
            self._deltas[:bb].copy_(staged[:, tw + 2])

    def _window_forward(self, bb: int, nb: int, steps: int, params: SamplingParams, forced: bool) -> None:
        """`steps` decode steps with their sampling over rows [0, bb), from the staged window inputs and the
        window's seeds to the static outputs (`_out_tokens` / `_out_logprobs` [max_batch, sync_every]); the
        whole window of `_run_window`'s graph. Graph-safe, and a rerun changes nothing a later run reads (it
        starts from the staged inputs; each step rewrites the cache slot it reads), so warm-ups are harmless.
        Padding rows sample too (their tokens are never read)."""
        self._load_window_inputs(bb)
        self._decode_steps(bb, steps, lambda: self._decode_forward(bb, nb), {params: None}, forced, True)

    def _decode_steps(self, rows: int, steps: int, forward: Callable[[], object],
                      groups: dict[SamplingParams, torch.Tensor | None], forced: bool, seeded: bool) -> None:
        """`steps` times: `forward()` (a decode step from the static inputs into the logits buffer), sample rows
        [0, rows) (the staged forced ids if `forced`, the window's seeds if `seeded`), write the tokens and
        log-probs to the static outputs' column and feed the tokens to the next step."""
        tw = self.table_width
        for t in range(steps):
            forward()
            tok, lp = self._sample(self._logits[:rows], groups, self._staged[:rows, tw + 4 + t] if forced else None,
                                   self._seeds[t:t + 1] if seeded else None)
            self._out_tokens[:rows, t], self._out_logprobs[:rows, t] = tok, lp
            self._tokens[:rows].copy_(tok)
            self._positions[:rows] += 1

    def _run_window(self, bb: int, nb: int, params: SamplingParams, forced: bool) -> None:
        """`_window_forward` over the whole window: one CUDA-graph replay (captured per row bucket, table width,
        sampling params and forced or not) where graphs are on, eager otherwise."""
        k = self.sync_every
        if self.use_cuda_graph:
            key = ("window", bb, nb, params, forced)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._capture(key, lambda: self._window_forward(bb, nb, k, params, forced),
                                      warmup=lambda: self._window_forward(bb, nb, 1, params, forced))
            if graph is not None:
                graph.replay()
                return
        self._window_forward(bb, nb, k, params, forced)

    def _decode_forward(self, bb: int, nb: int) -> None:
        """One decode step over rows [0, bb) attending over nb blocks, reading/writing only static buffers
        (graph-safe; idempotent for fixed buffer contents, so CUDA-graph warm-up runs change nothing)."""
        bs = self.block_size
        tables, positions = self._tables[:bb, :nb], self._positions[:bb]
        block = tables.gather(1, (positions // bs).clamp(max=nb - 1)[:, None])[:, 0]  # [bb]
        write = block * bs + positions % bs  # [bb] slot of the fed token
        if self.attention == "paged":  # the Triton kernel reads the blocks (kv_cache.attend)
            self.cache.set_view(write, None, tables, positions)
            attn = None
        else:
            offsets = torch.arange(bs, device=self.device)
            read = (tables[:, :, None] * bs + offsets).reshape(bb, nb * bs)  # [bb, kv_len]
            keys = torch.arange(nb * bs, device=self.device)
            attn = (keys[None, :] <= positions[:, None])[:, None, None, :]  # [bb, 1, 1, kv_len]
            self.cache.set_view(write, read)
        rope = positions if self._deltas is None else positions + self._deltas[:bb]  # [bb] (VLM: + M-RoPE delta)
        hidden = self.model(self._tokens[:bb, None], rope[:, None], attn_mask=attn, kv_cache=self.cache,
                            return_hidden=True)  # [bb, 1, H]
        if self._head_out is not None:  # the head writes the logits the fused sampler reads (no float32 copy)
            torch.matmul(hidden[:, -1], self.model.output_weight().t(), out=self._head_out[:bb])
        else:
            self._head_logits(hidden[:, -1], out=self._logits[:bb])

    def _head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """LM head on final-normed hidden states [b, H] only -> full-vocab logits [b, V] float32 (written into
        `out` [b, V] if given: on one rank, one cast-copy of the head's output, no float32 intermediate)."""
        local = torch.matmul(hidden, self.model.output_weight().t())  # [b, V_pad / tp]; as megatron's column linear
        if out is None:
            return gather_vocab_logits(local, self.tp_group, self.true_vocab_size)
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return out.copy_(local[:, :self.true_vocab_size])
        return out.copy_(gather_vocab_logits(local, self.tp_group, self.true_vocab_size))

    def _decode(self, bb: int, nb: int) -> torch.Tensor:
        """Run a decode step (graph replay when enabled) and return the logits buffer [max_batch, V] (`_logits`)."""
        if self.use_cuda_graph:
            graph = self._graphs.get((bb, nb))
            if graph is None:
                graph = self._capture((bb, nb), lambda: self._decode_forward(bb, nb))
            if graph is not None:
                graph.replay()
                return self._logits
        self._decode_forward(bb, nb)
        return self._logits

    def _capture(self, key: tuple, run: Callable[[], None], warmup: Callable[[], None] | None = None
                 ) -> torch.cuda.CUDAGraph | None:
        """Capture `run()` (graph-safe: static buffers only) in a CUDA graph stored under `key`, after two
        `warmup()` runs (default `run`; cuBLAS handles, kernel compiles, lazy allocations); on failure warn and
        go eager."""
        start = time.perf_counter()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    (warmup or run)()
            torch.cuda.current_stream().wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                run()
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager decode
            warnings.warn(f"CUDA graph capture of the decode step failed ({exc!r}); decoding eagerly")
            self.use_cuda_graph = False
            return None
        self._graphs[key] = graph
        self.stats["graph_captures"] += 1
        self.stats["capture_seconds"] += time.perf_counter() - start  # torch.cuda.graph syncs on exit
        return graph

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor, groups: dict[SamplingParams, torch.Tensor | None],
                forced: torch.Tensor | None, seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [b], logprobs [b]) for logits [b, V], each row with its request's sampling params.

        groups: `_sampling_groups(rows)`; forced: None or [b] int64 on the device (-1 = sample; `_forced_ids`);
        seed: None (drawn from the engine's generator) or the fused sampler's [1] seed (`_plain_fused` windows).
        A VLM's image / video pad tokens are masked out first (module docstring)."""
        if self.is_vlm:
            logits.index_fill_(1, self._banned, float("-inf"))
        if seed is not None:
            return self._sample_tokens(logits, next(iter(groups)), None, forced, seed=seed)
        if len(groups) == 1:
            return self._sample_tokens(logits, next(iter(groups)), self.generator, forced)
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        logprobs = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for params, index in groups.items():
            tokens[index], logprobs[index] = self._sample_tokens(logits[index], params, self.generator,
                                                                 None if forced is None else forced[index])
        return tokens, logprobs

    def _sampling_groups(self, rows: list[Sequence]) -> dict[SamplingParams, torch.Tensor | None]:
        """Row indices [k] on the device per distinct sampling params (one `sample_tokens` call each), built
        once per decode window; {params: None} when every row shares one."""
        groups: dict[SamplingParams, list[int]] = {}
        for r, seq in enumerate(rows):
            groups.setdefault(seq.params.sampling, []).append(r)
        if len(groups) == 1:
            return dict.fromkeys(groups)
        return {params: torch.tensor(idx, device=self.device) for params, idx in groups.items()}

    def _forced_ids(self, rows: list[Sequence], steps: int) -> np.ndarray | None:
        """[len(rows), steps] int64: the token forced (`eos_at`, `force_tokens`) at each row's next `steps`
        response tokens (numbers num_generated .. + steps - 1, 0-based), -1 where it samples; None when no
        row has any. Host-side lookups only: the token numbers are known on the host."""
        if not self._forced:
            return None
        ids = np.full((len(rows), steps), -1, dtype=np.int64)
        hit = False
        for r, seq in enumerate(rows):
            script = self._forced.get((seq.request_id, seq.sample_index))
            if script:
                first = seq.num_generated + seq.pending  # the window in flight decodes the pending ones
                numbers = script if len(script) < steps else range(first, first + steps)  # the shorter walk
                for number in numbers:
                    if first <= number < first + steps and number in script:
                        ids[r, number - first], hit = script[number], True
        return ids if hit else None
