"""Held-out evaluation during RL: generate on validation prompts, score with the reward function, report `val/` metrics.

    validator = Validator(generate, reward_fn, val_loader, dp_group=layout.dp_group)
    metrics = validator()   # {"val/reward_mean": ..., "val/accuracy": ..., "val/response_chars": ..., ...}

`PPOTrainer.fit` builds one from `data.val_path` (or a `val_dataloader` argument) and runs it before the
first step (`trainer.val_before_train`), every `trainer.val_every` steps and after the last step, merging
the metrics into that step's record (metrics.jsonl, TensorBoard). It receives only what it needs: a
`generate(prompt_ids) -> texts` function (the actor's rollout engine: greedy by default), the reward
function and the prompts, so it can be tested and reused without a trainer.

Reference: verl's `RayPPOTrainer._validate` (val-core/<data_source>/reward/mean@n), reduced to one set of
metrics over all data sources. Every data-parallel rank scores its share; sums are all-reduced over
`dp_group`, so the metrics are those of the whole validation set on every rank. A `PromptLoader` pads a
last batch that does not split evenly over dp ranks with prompts from the start (as DistributedSampler
does) so ranks generate in step; those copies (`PADDING_KEY`) are generated but not counted.
Simplification: rewards are computed on every rank of a model-parallel group (the values only feed metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from verl_mega.data.loader import PADDING_KEY
from verl_mega.rewards.base import RewardFunction
from verl_mega.rewards.batched import score_rewards
from verl_mega.trainer.batch import sample_images

# generate(prompt token ids [B lists]) -> B * n decoded responses, prompt-major
GenerateFn = Callable[[list[list[int]]], list[str]]


class Validator:
    """Evaluates a policy on fixed prompts (see module docstring).

    Args:
        generate: `generate(prompt_ids) -> texts`, n_samples texts per prompt, prompt-major; collective over
            the model-parallel group when the actor is sharded (every rank of it calls the validator).
        reward_fn: the run's reward (any form `RewardFunction` accepts).
        batches: an iterable of prompt batches (dataset items with `prompt_ids` and the reward fields),
            re-iterated on every call: a `PromptLoader` with shuffle=False, or a list of lists.
        n_samples: responses per prompt that `generate` returns.
        dp_group: data-parallel group whose ranks hold the other shares of the prompts (None: one share).
        timeout_s: per-response reward time limit.
    """

    def __init__(self, generate: GenerateFn, reward_fn: Callable, batches: Iterable[list[dict]], *,
                 n_samples: int = 1, dp_group=None, timeout_s: float = 30.0):
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.generate = generate
        self.reward_fn = RewardFunction(reward_fn)
        self.batches = batches
        self.n_samples = n_samples
        self.dp_group = dp_group
        self.timeout_s = timeout_s

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        """val/reward_mean (over all responses), val/accuracy (fraction of responses scoring exactly 1; only
        when every score is 0 or 1), val/response_chars (mean decoded length), val/num_prompts, val/reward_failures."""
        sums = torch.zeros(6, dtype=torch.float64)  # prompts, responses, score sum, ones, non-binary, failures
        length = 0.0
        for samples in self.batches:
            if not samples:
                continue
            ids = [list(s["prompt_ids"]) for s in samples]
            pixel_values, grids = sample_images(samples)
            texts = (self.generate(ids) if pixel_values is None else  # a VLM's prompts with images
                     self.generate(ids, images=[None if pv is None else (pv, g) for pv, g in zip(pixel_values, grids)]))
            if len(texts) != len(samples) * self.n_samples:
                raise ValueError(f"generate returned {len(texts)} responses for {len(samples)} prompts x "
                                 f"n_samples={self.n_samples}")
            counted = [i for i, s in enumerate(samples) if not s.get(PADDING_KEY)]  # generated in step, not scored
            rows = [samples[i] for i in counted for _ in range(self.n_samples)]
            texts = [texts[i * self.n_samples + j] for i in counted for j in range(self.n_samples)]
            if not rows:
                continue
            res = score_rewards(self.reward_fn, texts, rows, timeout_s=self.timeout_s)  # batched or per response
            scores = res.scores.double()
            sums += torch.tensor([len(counted), len(texts), float(scores.sum()), float((scores == 1).sum()),
                                  float(((scores != 0) & (scores != 1)).sum()), res.failures + res.timeouts],
                                 dtype=torch.float64)
            length += sum(len(t) for t in texts)
        sums = torch.cat([sums, torch.tensor([length], dtype=torch.float64)])
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(sums, group=self.dp_group)
        prompts, responses, total, ones, non_binary, failures, chars = sums.tolist()
        if responses == 0:
            raise ValueError("validation: the validation data yielded no prompt")
        out = {"val/reward_mean": total / responses, "val/response_chars": chars / responses,
               "val/num_prompts": prompts, "val/reward_failures": failures}
        if non_binary == 0:
            out["val/accuracy"] = ones / responses
        return out


def actor_generate_fn(actor, *, max_new_tokens: int, temperature: float = 0.0, n: int = 1, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0) -> GenerateFn:
    """`generate(prompt_ids, images=None) -> texts` on an `HFActor`'s rollout engine (`actor.generate`), n per
    prompt (images: one (pixel_values, image_grid_thw) or None per prompt, for a VLM)."""
    def generate(prompt_ids: list[list[int]], images: list | None = None) -> list[str]:
        out = actor.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, n=n, top_k=top_k,
                             top_p=top_p, seed=seed, images=images)
        return [o["response"] for o in out]

    return generate


def agent_generate_fn(worker, tokenizer, toolset, limits, *, temperature: float = 0.0, n: int = 1, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0) -> GenerateFn:
    """`generate(prompt_ids, images=None) -> texts` through the agent loop (`rollout/agent_loop.py`) on a
    `RolloutWorker`: with tools the held-out responses are multi-turn as in training (tool calls run, their
    results in the text the reward reads; special tokens skipped as the Rollout stage decodes). No images."""
    from verl_mega.rollout.agent_loop import agent_rollout
    from verl_mega.rollout.sampling import SamplingParams

    def generate(prompt_ids: list[list[int]], images: list | None = None) -> list[str]:
        if images is not None and any(i is not None for i in images):
            raise ValueError("multi-turn tool validation with images is not supported; drop rollout.tools")
        samples, _ = agent_rollout(worker, tokenizer, toolset, limits, prompt_ids, n=n, seed=seed,
                                   sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        return [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]

    return generate
