"""RolloutWorker: the one place where prompts become responses on a (possibly sharded, pipelined) actor.

What it owns, in call order for `generate(prompt_ids, ...)`:
  1. the weight hand-over: `weights.to_inference()` (a `HybridEngine`: training layout -> generation
     layout; or `InPlaceWeights` when the training stage already is a one-stage model, pp = 1);
  2. ONE generation engine on the inference model, kept between calls while the inference weights'
     storage has not moved (captured CUDA graphs read that memory) and it is big enough;
  3. the split of the prompts over the generation micro-DP replicas (each replica generates a
     contiguous share) and the all-gather of (responses, log-probs) back, so every rank of the
     model-parallel group ends with the same rows, prompt-major;
  4. the hand-back: `weights.to_train()` (and, with `free_cache`, the engine's KV cache).

Images (a vision-language model): `generate(..., images=[(pixel_values, image_grid_thw) or None per prompt])`;
each replica's engine encodes the images of its own share of the prompts, once per prompt, in one tower call per
admission step (`images.py`).

Its clients: the trainer's `Rollout` stage, `HFActor.generate()` / `verl_mega.rollout.generate`,
`verl-mega generate`. `on_finish(row, token_ids, logprobs)` is called for every row of this replica
the moment it finishes (streaming rewards hook); rows of other replicas are not reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist

from verl_mega.rollout.engine import EngineConfig, GenerationEngine
from verl_mega.rollout.sampling import SamplingParams


@dataclass
class RolloutResult:
    """Rows of one `RolloutWorker.generate` call, prompt-major (rows i*n .. i*n+n-1 answer prompt i)."""

    responses: list[list[int]]  # generated token ids per row (the stop token included)
    logprobs: list[list[float]]  # sampler log-probs per generated token
    timings: dict[str, float] = field(default_factory=dict)  # "reshard", "generate" and (within it) "graph_capture" s


@dataclass
class ReplicaGroups:
    """How the inference model is replicated: `tp_group` shards one replica; `micro_dp` replicas
    (this rank is `micro_dp_rank` of `micro_dp_group`) split the prompts."""

    tp_group: dist.ProcessGroup | None
    micro_dp: int = 1
    micro_dp_rank: int = 0
    micro_dp_group: dist.ProcessGroup | None = None


class InPlaceWeights:
    """Weights hand-over for a one-stage training model (pp = 1, tp_g = tp): nothing to move."""

    def __init__(self, model: torch.nn.Module, tp_group: dist.ProcessGroup | None):
        self.model = model
        self.replicas = ReplicaGroups(tp_group)

    def to_inference(self) -> torch.nn.Module:
        return self.model

    def to_train(self) -> torch.nn.Module:
        return self.model


class HybridWeights:
    """Weights hand-over through a `HybridEngine` (training layout -> generation layout and back)."""

    def __init__(self, hybrid):
        self.hybrid = hybrid
        inf = hybrid.inference_layout
        self.replicas = ReplicaGroups(inf.tp_g_group, inf.micro_dp, inf.micro_dp_rank, inf.micro_dp_group)

    def to_inference(self) -> torch.nn.Module:
        return self.hybrid.to_inference()

    def to_train(self) -> torch.nn.Module:
        return self.hybrid.to_train()


class RolloutWorker:
    """Generate on the inference layout of a training model; see the module docstring.

    weights: `InPlaceWeights(model, tp_group)` or `HybridWeights(hybrid_engine)`.
    eos_token_ids / pad_token_id: the model's stop tokens and pad id (`frontend.stop_ids`).
    tp_g: the generation tensor-parallel size the weights are handed over at (for the owner's bookkeeping).
    engine_config: sizes and switches of the generation engine (`EngineConfig`).
    free_cache: release the KV cache after each call, leaving the memory to training (the engine keeps the CUDA
    graphs that read the cache through its address table: `GenerationEngine.release`).
    """

    def __init__(self, weights, *, eos_token_ids, pad_token_id: int, tp_g: int | None = None,
                 engine_config: EngineConfig | None = None, free_cache: bool = False):
        self.weights = weights
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.tp_g = tp_g
        self.engine_config = engine_config or EngineConfig()
        self.free_cache = free_cache
        self._engine: GenerationEngine | None = None
        self._engine_key: tuple | None = None

    def configure(self, engine_config: EngineConfig, free_cache: bool) -> None:
        """Use `engine_config` from the next call on (the engine is rebuilt if it changed)."""
        if engine_config != self.engine_config:
            self.release()
            self._engine = None
        self.engine_config, self.free_cache = engine_config, free_cache

    @property
    def replicas(self) -> ReplicaGroups:
        return self.weights.replicas

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams,
                 n: int = 1, seed: int = 0, stop_token_ids=(), ignore_eos: bool = False,
                 on_finish: Callable[[int, list[int], list[float]], None] | None = None,
                 engine_config: EngineConfig | None = None, eos_at: list[int] | None = None,
                 images: list | None = None) -> RolloutResult:
        """n responses per prompt for `prompt_ids` (B token-id lists, the same on every rank of the
        model-parallel group); collective over it. `seed` seeds this replica's sampler (the worker
        offsets it by the micro-DP rank so replicas draw independently). `on_finish(row, ids, logprobs)`:
        called as each of this replica's rows finishes (`row` indexes the returned rows).
        engine_config: use this engine config for this call only (a separate engine; None: the worker's).
        eos_at: None or one forced response length per row, prompt-major over all B x n rows (the same on
        every rank): row r ends with EOS as its token number eos_at[r] (`GenerationEngine`, "forced lengths").
        images: None or one entry per prompt (the same on every rank): None for a text prompt, or its
        (pixel_values, image_grid_thw); each replica's engine encodes its own prompts' images once."""
        if images is not None and len(images) != len(prompt_ids):
            raise ValueError(f"images has {len(images)} entries for {len(prompt_ids)} prompts (one per prompt)")
        if eos_at is not None and len(eos_at) != len(prompt_ids) * n:
            raise ValueError(f"eos_at has {len(eos_at)} lengths for {len(prompt_ids)} prompts x n={n} rows")

        capture_s = []

        def run(model, first: int, mine: list[list[int]]) -> list:
            seq_len, rows = max(map(len, mine)) + max_new_tokens, len(mine) * n
            one_off = engine_config is not None and engine_config != self.engine_config
            engine = self._build(model, engine_config, seq_len, rows) if one_off else self.engine(model, seq_len, rows)
            captured = engine.stats["capture_seconds"]
            callback = None
            if on_finish is not None:
                def callback(row, ids, lps, offset=first * n):
                    on_finish(offset + row, ids, lps)
            rep = self.replicas
            responses, logprobs = engine.generate_rows(
                mine, max_new_tokens=max_new_tokens, sampling=sampling, n=n,
                seed=(seed + 7919 * rep.micro_dp_rank) % 2**62, stop_token_ids=stop_token_ids,
                ignore_eos=ignore_eos, on_finish=callback,
                eos_at=None if eos_at is None else eos_at[first * n:(first + len(mine)) * n],
                images=None if images is None else images[first:first + len(mine)])
            capture_s.append(engine.stats["capture_seconds"] - captured)
            if self.free_cache or one_off:
                engine.release(graphs=one_off)
            return list(zip(responses, logprobs))

        rows, timings = self.run_on_replicas(prompt_ids, run)
        timings["graph_capture"] = sum(capture_s)  # inside "generate"
        return RolloutResult(responses=[r for r, _ in rows], logprobs=[lp for _, lp in rows], timings=timings)

    def run_on_replicas(self, prompt_ids: list[list[int]], run: Callable[[torch.nn.Module, int, list[list[int]]], list]
                        ) -> tuple[list, dict[str, float]]:
        """Hand the weights over to the inference layout, call `run(model, first, mine)` on this replica's
        share of the prompts (`mine = prompt_ids[first:first + share]`, skipped when empty; it returns that
        share's rows), all-gather the rows of every micro-DP replica in prompt order and hand the weights back.
        Returns (rows of all B prompts, {"reshard", "generate"} seconds). Collective over the model-parallel
        group; the one split/gather used by `generate` and the agent loop."""
        rep = self.replicas
        start = time.perf_counter()
        model = self.weights.to_inference()
        reshard_s = time.perf_counter() - start
        try:
            share = -(-len(prompt_ids) // rep.micro_dp)
            first = rep.micro_dp_rank * share
            mine = prompt_ids[first:first + share]
            gen_start = time.perf_counter()
            local = run(model, first, mine) if mine else []
            gen_s = time.perf_counter() - gen_start
            gathered: list = [(rep.micro_dp_rank, local)]
            if rep.micro_dp > 1:
                gathered = [None] * rep.micro_dp
                dist.all_gather_object(gathered, (rep.micro_dp_rank, local), group=rep.micro_dp_group)
        finally:
            back = time.perf_counter()
            self.weights.to_train()
            reshard_s += time.perf_counter() - back
        rows = [row for _, part in sorted(gathered, key=lambda item: item[0]) for row in part]  # micro-DP rank order
        return rows, {"reshard": reshard_s, "generate": gen_s}

    def engine(self, model: torch.nn.Module, seq_len: int, rows: int) -> GenerationEngine:
        """The generation engine for `model`, rebuilt when the weights' storage moved (a reshard that
        re-allocated them), `seq_len` exceeds its max_seq_len or `rows` sequences of `seq_len` tokens
        would want more KV-cache tokens than it has (up to the configured max_tokens)."""
        key = (id(model), tuple(p.data_ptr() for p in model.parameters()))
        engine = self._engine
        if (engine is None or self._engine_key != key or engine.max_seq_len < seq_len
                or engine.config.max_tokens < self._kv_tokens(self.engine_config, seq_len, rows)):
            if engine is not None:
                engine.release(graphs=True)  # replaced: its graphs' memory goes now, not when it is collected
                seq_len = max(seq_len, engine.max_seq_len)
                rows = max(rows, engine.config.max_tokens // seq_len)
            self._engine = self._build(model, self.engine_config, seq_len, rows)
            self._engine_key = key
        return self._engine

    @staticmethod
    def _kv_tokens(config: EngineConfig, seq_len: int, rows: int) -> int:
        """KV-cache tokens for `rows` sequences of `seq_len` tokens, within config.max_tokens."""
        return min(config.max_tokens, rows * seq_len + 64 * config.block_size)  # + slack for decode windows, forks

    def _build(self, model: torch.nn.Module, config: EngineConfig, seq_len: int, rows: int) -> GenerationEngine:
        """An engine sized for `rows` sequences of up to `seq_len` tokens (KV memory follows the call)."""
        config = config.resized(max_seq_len=seq_len)
        config = replace(config, max_tokens=self._kv_tokens(config, config.max_seq_len, rows))
        return GenerationEngine(model, self.replicas.tp_group, config, eos_token_ids=self.eos_token_ids,
                                pad_token_id=self.pad_token_id)

    def release(self) -> None:
        """Free the engine's KV cache and CUDA graphs (rebuilt on the next call)."""
        if self._engine is not None:
            self._engine.release(graphs=True)
