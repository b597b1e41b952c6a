"""Dataflow stages of an RL step, composed with `>>`:

    pipeline = rollout >> reward >> logprobs >> Advantage() >> Update() >> Metrics()
    batch = pipeline(batch, trainer)

A stage is any callable `(batch: RLBatch, ctx) -> RLBatch`; `Stage` subclasses add `>>` and a name,
and a plain function can take any place (`pipeline.replace("reward", my_fn)` or `rollout >> my_fn`).
`Rollout(worker, rollout_config, ...)`, `Reward(reward_runner)` and `LogProbs(actor_engine, reference,
critic_engine, layout, ...)` get what they need when they are built (`ppo_trainer.default_pipeline(trainer)`
builds them) and ignore `ctx`. Advantage / Update / Metrics still read `ctx`, the trainer
(`PPOTrainer`): `config` (TrainerConfig), `layout`, `device`, `actor_engine`, `critic_engine` (or
None), `kl_ctl` (read only; the trainer updates it from the `actor/reward_kl_penalty` metric).

Every rank runs every stage (SPMD). Rewards are computed on the first rank of each model-parallel
group and broadcast inside it (`reward_runner.py`). Metrics are per data-parallel rank until
`Metrics` averages them over dp.

An on-policy update (one epoch over one mini-batch: `config.update_takes_own_logprobs`) takes the old log-probs
from its own forward, which runs on the weights the rollout sampled from: `LogProbs(..., old=False)` skips that
forward pass over the batch, and the policy loss's ratio is exactly 1 (`trainer.old_logprobs: recompute` keeps the
separate pass).

Reference: HybridFlow's (verl's) PPO dataflow — generate, reward, old/ref log-probs + values,
advantages, actor/critic update.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from verl_mega.algorithms.advantages import get_advantage_estimator, outcome_to_token_rewards
from verl_mega.algorithms.kl import apply_kl_penalty, kl_loss, kl_penalty
from verl_mega.algorithms.losses import entropy_bonus, policy_loss, value_loss
from verl_mega.kernels import fused_logprob_entropy
from verl_mega.rewards.base import extra_means
from verl_mega.rollout.agent_loop import AgentLimits, agent_metrics, agent_rollout
from verl_mega.rollout.sampling import SamplingParams
from verl_mega.trainer.batch import RLBatch
from verl_mega.trainer.config import micro_batch_sizes
from verl_mega.trainer.packing import gather_to_owners, unpack_responses

StageFn = Callable[[RLBatch, object], RLBatch]


def stage_name(stage) -> str:
    return getattr(stage, "name", None) or getattr(stage, "__name__", None) or type(stage).__name__.lower()


class Stage:
    """Base of the named stages: `__call__(batch, ctx) -> batch` and `>>` composition."""

    name = "stage"

    def __call__(self, batch: RLBatch, ctx) -> RLBatch:
        raise NotImplementedError

    def __rshift__(self, other: StageFn) -> "Pipeline":
        return Pipeline([self, other])

    def __rrshift__(self, other: StageFn) -> "Pipeline":
        return Pipeline([other, self])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Pipeline(Stage):
    """Stages run in order; each stage's wall time lands in `batch.timings[name]`."""

    name = "pipeline"

    def __init__(self, stages: list[StageFn]):
        self.stages: list[StageFn] = []
        for s in stages:
            if not callable(s):
                raise ValueError(f"a pipeline stage must be callable (batch, ctx) -> batch, got {type(s).__name__}")
            self.stages += s.stages if isinstance(s, Pipeline) else [s]

    def __rshift__(self, other: StageFn) -> "Pipeline":
        return Pipeline([*self.stages, other])

    def __rrshift__(self, other: StageFn) -> "Pipeline":
        return Pipeline([other, *self.stages])

    def __call__(self, batch: RLBatch, ctx) -> RLBatch:
        for s in self.stages:
            start = time.perf_counter()
            with torch.profiler.record_function(f"stage/{stage_name(s)}"):  # a profiler's per-stage range
                out = s(batch, ctx)
            if not isinstance(out, RLBatch):
                raise ValueError(f"stage {stage_name(s)!r} returned {type(out).__name__}; a stage must return the RLBatch")
            batch = out
            batch.timings[stage_name(s)] = batch.timings.get(stage_name(s), 0.0) + time.perf_counter() - start
        return batch

    def names(self) -> list[str]:
        return [stage_name(s) for s in self.stages]

    def replace(self, name: str, stage: StageFn) -> "Pipeline":
        """A copy with the stage called `name` swapped for `stage` (ValueError if there is none)."""
        if name not in self.names():
            raise ValueError(f"no stage named {name!r} in the pipeline; stages: {self.names()}")
        return Pipeline([stage if stage_name(s) == name else s for s in self.stages])

    def __repr__(self) -> str:
        return " >> ".join(repr(s) if isinstance(s, Stage) else stage_name(s) for s in self.stages)


# ----------------------------------------------------------------------------- helpers
def response_logprobs(hidden: torch.Tensor, mb: dict, model, tp_group, temperature: float,
                      compute_entropy: bool, check_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) [b, R] of the response tokens from the last stage's final hidden [b, S, H].

    Response token t sits at column P + t and is predicted at column P + t - 1 (see batch.py); the
    fused vocab-parallel kernel never materialises the [b, R, V] logits. A packed micro-batch (hidden
    [1, T, H], see packing.py) runs the kernel on the valid response tokens only and unpacks to [b, R]
    (0 at padding). `check_labels=False`: the ids were checked on the host (`training_microbatches`), and the
    kernel need not wait for the forward to check them (see `fused_logprob_entropy`).
    """
    resp = mb["responses"].to(hidden.device)
    b, r = resp.shape
    if "response_index" in mb:
        h = hidden[0, mb["response_index"].to(hidden.device)]  # [n, hidden]
        labels = resp.reshape(-1)[mb["response_slot"].to(hidden.device)]  # [n]
    else:
        h, labels = hidden[:, -r - 1:-1].reshape(b * r, -1), resp.reshape(-1)  # [batch*R, hidden]
    lp, ent = fused_logprob_entropy(h, model.output_weight(), labels, tp_group=tp_group,
                                    vocab_start=model.vocab_start_index, true_vocab_size=model.true_vocab_size,
                                    temperature=temperature, compute_entropy=compute_entropy,
                                    check_labels=check_labels)
    if "response_index" in mb:
        return unpack_responses(lp.float(), mb), (unpack_responses(ent.float(), mb) if compute_entropy else None)
    return lp.float().view(b, r), (ent.float().view(b, r) if compute_entropy else None)


def response_values(values: torch.Tensor, mb: dict) -> torch.Tensor:
    """Critic values [b, R] of the states before each response token from the value model's [b, S] output
    (packed [1, T]: unpacked to [b, R], 0 at padding)."""
    if "response_index" in mb:
        return unpack_responses(values[0, mb["response_index"].to(values.device)].float(), mb)
    r = mb["responses"].shape[1]
    return values[:, -r - 1:-1].float()


def training_microbatches(batch: RLBatch, trainer_cfg, layout, device, rows: torch.Tensor | None = None,
                          keys: tuple[str, ...] = (), forward_only: bool = False, *, vocab: int | None = None):
    """Micro-batches of `rows` as the trainer config section asks: packed or padded, by token budget or row
    count (`forward_only`: the forward-only passes' sizes, `micro_batch_sizes`); packed with a token budget and
    dp > 1, rows are re-dealt over dp for equal token counts. `vocab`: the models' vocabulary size, every id is
    checked against it on the host (the stages' log-prob calls then skip their own check)."""
    t = trainer_cfg
    size, max_tokens = micro_batch_sizes(t, forward_only)
    return batch.microbatches(size, rows, keys, device=device, packed=t.packing, max_tokens=max_tokens,
                              dp_group=_balance_group(t, layout, forward_only), vocab=vocab)


def _balance_group(trainer_cfg, layout, forward_only: bool = False):
    """The dp group rows are re-dealt over (packed, token budget, dp > 1), else None."""
    balanced = trainer_cfg.packing and micro_batch_sizes(trainer_cfg, forward_only)[1] is not None and layout.dp > 1
    return layout.dp_group if balanced else None


def rows_in_order(outs: list[dict], mbs: list[dict], key: str, dp_group=None, width: int | None = None
                  ) -> torch.Tensor:
    """Per-micro-batch outputs `outs[i][key]` [b_i, ...] -> one CPU tensor in batch row order (mb["rows"]).
    With `dp_group` (rows re-dealt over dp, see packing.balance_over_dp; collective) each rank gets back its
    own rows, cut to `width` columns."""
    rows = torch.cat([mb["rows"].cpu() for mb in mbs])
    values = torch.cat([o[key].cpu() for o in outs])
    if dp_group is not None:
        return gather_to_owners(values, rows, dp_group)[:, :width]
    return values[torch.argsort(rows)]


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the tokens where mask [N, R] is set, a 0-dim tensor where x is (no host sync)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(_token_mean(x, mask))


# ----------------------------------------------------------------------------- stages
def clip_ratio(response_mask: torch.Tensor, limit: int) -> float:
    """Fraction of the responses (rows of response_mask [N, R]) that reached `limit` tokens (a response whose
    stop token fell on the limit counts too, as in verl)."""
    return float((response_mask.sum(-1) >= limit).float().mean())


class Rollout(Stage):
    """Prompts -> n responses each, through the RolloutWorker (HybridEngine hand-over, one generation
    engine, split/gather over the inference replicas); every rank of a model-parallel group ends with
    the same rows. With a `rewards` runner each response is handed to it the moment it finishes.

    worker: `RolloutWorker`; config: the `rollout` config section (max_new_tokens, sampling);
    seed: the run's seed; tokenizer (or None: responses become space-joined ids); pad_id: response
    padding; dp_rank: this rank's data-parallel index (seeds differ per replica); rewards: a
    `RewardRunner` to stream responses to, or None; tools: a `verl_mega.tools.ToolSet` (or None):
    multi-turn samples through the agent loop (`rollout/agent_loop.py`, limits from the config section),
    with a loss mask over the model's own tokens and `agent/...` metrics; width_multiple: the batch's
    sequence width is padded to a multiple of it (`RLBatch.set_rollout`).
    """

    name = "rollout"

    def __init__(self, worker, config, *, seed: int, tokenizer, pad_id: int, dp_rank: int = 0, rewards=None,
                 tools=None, width_multiple: int = 1):
        self.worker, self.config, self.seed, self.tokenizer = worker, config, seed, tokenizer
        self.pad_id, self.dp_rank, self.rewards, self.tools = pad_id, dp_rank, rewards, tools
        self.width_multiple = width_multiple
        if tools is not None and not getattr(tokenizer, "chat_template", None):  # tool results are chat messages
            raise ValueError("Rollout with tools needs a tokenizer with a chat template (tool results are appended "
                             "as `tool` messages through it)")

    def decode(self, ids: list[int]) -> str:
        """A response's text (special tokens skipped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None \
            else " ".join(map(str, ids))

    def __call__(self, batch: RLBatch, ctx=None) -> RLBatch:
        cfg = self.config
        on_finish = None
        if self.rewards is not None:
            self.rewards.start(batch.row_samples, self.decode)
            on_finish = lambda row, ids, _lps: self.rewards.submit(row, ids)  # noqa: E731
        seed = (self.seed * 1_000_003 + batch.step * 7919 + self.dp_rank * 131) % 2**62
        if self.tools is not None:
            if batch.pixel_values is not None:
                raise ValueError("multi-turn tool rollouts with images are not supported; drop rollout.tools "
                                 "for a vision-language dataset")
            return self._agent(batch, seed)
        out = self.worker.generate(batch.prompt_ids, max_new_tokens=cfg.max_new_tokens, n=batch.n, seed=seed,
                                   sampling=SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p),
                                   on_finish=on_finish, images=batch.prompt_images())
        batch.set_rollout(out.responses, out.logprobs, self.pad_id, width_multiple=self.width_multiple)
        batch.response_texts = [self.decode(r) for r in out.responses]
        batch.timings.update(out.timings)
        batch.metrics["response_length/clip_ratio"] = clip_ratio(batch.response_mask, cfg.max_new_tokens)
        return batch

    def _agent(self, batch: RLBatch, seed: int) -> RLBatch:
        """Multi-turn samples with tool calls (the whole response, tool results included, is scored)."""
        cfg = self.config
        limits = AgentLimits.from_rollout_config(cfg)
        samples, timings = agent_rollout(self.worker, self.tokenizer, self.tools, limits, batch.prompt_ids, n=batch.n,
                                         seed=seed, sampling=SamplingParams(temperature=cfg.temperature,
                                                                            top_k=cfg.top_k, top_p=cfg.top_p))
        batch.set_rollout([s.response_ids for s in samples], [s.logprobs for s in samples], self.pad_id,
                          loss_masks=[s.loss_mask for s in samples], width_multiple=self.width_multiple)
        batch.response_texts = [self.decode(s.response_ids) for s in samples]
        batch.metrics.update(agent_metrics(samples))
        batch.metrics["response_length/clip_ratio"] = clip_ratio(batch.response_mask, limits.max_total_tokens)
        batch.timings.update(timings)
        if self.rewards is not None:
            self.rewards.start(batch.row_samples, self.decode)
            for row, s in enumerate(samples):
                self.rewards.submit(row, s.response_ids)
        return batch

    def __repr__(self) -> str:
        return "Rollout(worker, tools)" if self.tools is not None else "Rollout(worker)"


class Reward(Stage):
    """Collect every response's score from the `RewardRunner` (scored while generation ran, or now);
    failures and timeouts score 0 and are counted; numeric extra keys of dict results (a combination's
    per-part `score_k`, a rule's `acc`, ...) become `reward/extra/<key>` metrics (their means)."""

    name = "reward"

    def __init__(self, rewards):
        self.rewards = rewards

    def __call__(self, batch: RLBatch, ctx=None) -> RLBatch:
        res = self.rewards.collect(batch.response_texts, batch.row_samples)
        batch.scores, batch.reward_failures, batch.reward_timeouts = res.scores.float(), res.failures, res.timeouts
        batch.reward_errors = res.errors
        batch.metrics.update(extra_means(res.extras))
        return batch

    def __repr__(self) -> str:
        return "Reward(runner)"


class LogProbs(Stage):
    """Old actor log-probs (unless the update takes its own), reference log-probs (if a reference exists) and
    critic values (if a critic exists).

    actor: the actor's TrainEngine; reference: a FrozenModel or None; critic: the critic's TrainEngine
    or None; layout: the training Layout; temperature: the rollout temperature (log-probs of the
    sampled distribution); trainer_cfg: the trainer section (micro-batching); device: where micro-batches go;
    old: compute the old log-probs (False where `config.update_takes_own_logprobs`: `batch.old_logprobs` stays None
    and the Update stage takes them from its own forward).
    """

    name = "logprob"

    def __init__(self, actor, reference, critic, layout, *, temperature: float, trainer_cfg, device, old: bool = True):
        self.actor, self.reference, self.critic, self.layout = actor, reference, critic, layout
        self.temperature, self.trainer_cfg, self.device, self.old = temperature, trainer_cfg, device, old

    def __call__(self, batch: RLBatch, ctx=None) -> RLBatch:
        if not (self.old or self.reference is not None or self.critic is not None):
            return batch
        mbs = training_microbatches(batch, self.trainer_cfg, self.layout, self.device, forward_only=True,
                                    vocab=self.actor.model.true_vocab_size)
        back = {"dp_group": _balance_group(self.trainer_cfg, self.layout, forward_only=True),
                "width": batch.responses.shape[1]}
        tp_group = self.layout.tp_group
        if self.old:
            batch.old_logprobs = self._logprobs(self.actor, mbs, tp_group, self.temperature, back)
        if self.reference is not None:
            batch.ref_logprobs = self._logprobs(self.reference, mbs, tp_group, self.temperature, back)
        if self.critic is not None:
            outs = self.critic.forward_only(mbs, lambda v, mb: {"values": response_values(v, mb)})
            batch.values = rows_in_order(outs, mbs, "values", **back)
        return batch

    def __repr__(self) -> str:
        return f"LogProbs({'actor, ' if self.old else ''}reference, critic)"

    @staticmethod
    def _logprobs(engine, mbs, tp_group, temperature: float, back: dict) -> torch.Tensor:
        model = engine.model

        def output_fn(hidden, mb):
            lp, _ = response_logprobs(hidden, mb, model, tp_group, temperature, False, check_labels=False)
            return {"logprobs": lp}

        return rows_in_order(engine.forward_only(mbs, output_fn), mbs, "logprobs", **back)


class Advantage(Stage):
    """Token rewards (outcome on the last token, optionally minus coef * KL) -> advantages and returns."""

    name = "advantage"

    def __call__(self, batch: RLBatch, ctx) -> RLBatch:
        a = ctx.config.algorithm
        mask = batch.train_mask  # the model's own tokens (tool results are not actions)
        rewards = outcome_to_token_rewards(batch.scores, mask)
        if a.kl_coef > 0 and a.kl_in_reward:
            rewards, kl_mean = apply_kl_penalty(rewards, batch.old_logprobs, batch.ref_logprobs, mask,
                                                ctx.kl_ctl.value, a.kl_estimator)
            batch.metrics["actor/reward_kl_penalty"] = float(kl_mean)  # the trainer updates its KL controller from it
        estimator = get_advantage_estimator("gae" if a.name == "ppo" else a.name)
        batch.token_rewards = rewards
        batch.advantages, batch.returns = estimator(
            rewards, mask, values=batch.values, group_size=batch.n, gamma=a.gamma, lam=a.lam,
            norm_by_std=a.norm_adv_by_std, whiten=a.whiten_gae,
            dp_group=ctx.layout.dp_group)  # batch-level whitening over the whole (DP-split) batch
        batch.metrics.update(advantage_stats(batch.advantages, mask))
        if batch.values is not None:
            batch.metrics.update(critic_diagnostics(batch.values, batch.returns, mask))
        return batch


def advantage_stats(advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """advantage/{mean, std, max, min} over the valid tokens of advantages [N, R] (this rank's rows)."""
    valid = advantages[mask.bool()]
    if valid.numel() == 0:
        return {}
    return {"advantage/mean": float(valid.mean()), "advantage/std": float(valid.std(unbiased=False)),
            "advantage/max": float(valid.max()), "advantage/min": float(valid.min())}


def critic_diagnostics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How well the rollout-time critic predicted the returns, over valid tokens of [N, R] tensors:

        critic/explained_variance = 1 - Var(returns - values) / Var(returns)   (verl's vf_explained_var;
                                    1 = perfect, 0 = no better than a constant, < 0 = worse)
        critic/value_error        = mean (values - returns)^2                  (the unclipped vf mse)
    and critic/values_mean, critic/returns_mean. Var(returns) = 0 (all returns equal) gives NaN explained variance.
    """
    m = mask.bool()
    v, ret = values[m].double(), returns[m].double()
    if ret.numel() == 0:
        return {}
    var_ret = ret.var(unbiased=False)
    ev = 1.0 - (ret - v).var(unbiased=False) / var_ret if var_ret > 0 else torch.tensor(float("nan"))
    return {"critic/explained_variance": float(ev), "critic/value_error": float(((v - ret) ** 2).mean()),
            "critic/values_mean": float(v.mean()), "critic/returns_mean": float(ret.mean())}


class Update(Stage):
    """PPO epochs over shuffled mini-batches: actor (clipped policy loss, entropy bonus, KL loss) and critic
    (clipped value loss; trainer.critic_epochs passes, the actor's own skipped for algorithm.critic_warmup steps)."""

    name = "update"

    def __call__(self, batch: RLBatch, ctx) -> RLBatch:
        t = ctx.config.trainer
        rows_per_update = (t.mini_batch_size or batch.num_prompts) * batch.n
        own = batch.old_logprobs is None  # the old log-probs come from the update's own forward (LogProbs, old=False)
        if own and (t.num_epochs > 1 or rows_per_update < batch.num_rows):
            raise ValueError("the batch has no old log-probs, and this update is not on-policy (trainer.num_epochs="
                             f"{t.num_epochs}, {batch.num_rows // rows_per_update} mini-batches): its later passes "
                             "need the rollout policy's log-probs; build the LogProbs stage with old=True "
                             "(trainer.old_logprobs: recompute)")
        if own:  # the sampler's and the reference's log-probs for the diagnostics (rollout/logprob_diff, kl_ref)
            keys = ["advantages"] + [k for k in ("rollout_logprobs", "ref_logprobs") if getattr(batch, k) is not None]
        else:
            keys = ["old_logprobs", "advantages"] + (["ref_logprobs"] if self._kl_loss(ctx) else [])
        if ctx.critic_engine is not None:
            keys += ["values", "returns"]
        gen = torch.Generator().manual_seed(t.seed * 1_000_003 + batch.step)  # same order on every rank of a replica
        actor_stats: list[dict] = []
        critic_stats: list[dict] = []
        # verl's critic_warmup: the first steps fit the critic to the current policy before the actor moves
        update_actor = batch.step >= ctx.config.algorithm.critic_warmup or ctx.critic_engine is None
        actor_epochs = t.num_epochs if update_actor else 0
        critic_epochs = (t.critic_epochs or t.num_epochs) if ctx.critic_engine is not None else 0
        for epoch in range(max(actor_epochs, critic_epochs)):
            order = torch.randperm(batch.num_rows, generator=gen)
            for start in range(0, batch.num_rows, rows_per_update):
                mbs = training_microbatches(batch, t, ctx.layout, ctx.device, order[start:start + rows_per_update],
                                            tuple(keys), vocab=ctx.actor_engine.model.true_vocab_size)
                if epoch < actor_epochs:
                    actor_stats.append(self._actor_update(mbs, ctx))
                if epoch < critic_epochs:
                    critic_stats.append(self._critic_update(mbs, ctx))
        actor_metrics = _mean_dicts(actor_stats, prefix="actor/")
        if "actor/rollout_logprob_diff" in actor_metrics:  # own old log-probs: the Metrics stage's name
            actor_metrics["rollout/logprob_diff"] = actor_metrics.pop("actor/rollout_logprob_diff")
        batch.metrics.update(actor_metrics)
        batch.metrics.update(_mean_dicts(critic_stats, prefix="critic/"))
        return batch

    @staticmethod
    def _kl_loss(ctx) -> bool:
        a = ctx.config.algorithm
        return a.kl_coef > 0 and not a.kl_in_reward

    @staticmethod
    def _normaliser(engine, mbs, agg: str) -> dict:
        """Engine arguments making loss_sum / normaliser the aggregation's mean over the global mini-batch."""
        if agg == "token-mean":
            return {"loss_mask_key": "loss_mask"}
        for mb in mbs:
            mb["sequence_count"] = (mb["loss_mask"].sum(-1) > 0).float()
        return {"loss_normalizer": engine.global_token_count(mbs, "sequence_count")}

    def _actor_update(self, mbs: list[dict], ctx) -> dict[str, float]:
        a, temp = ctx.config.algorithm, ctx.config.rollout.temperature
        engine = ctx.actor_engine
        model, tp_group, use_kl = engine.model, ctx.layout.tp_group, self._kl_loss(ctx)

        def loss_fn(hidden, mb):
            mask = mb["loss_mask"]
            lp, ent = response_logprobs(hidden, mb, model, tp_group, temp, True, check_labels=False)
            own = "old_logprobs" not in mb  # on-policy: this forward runs on the rollout's weights (Update.__call__)
            old = lp.detach() if own else mb["old_logprobs"]
            loss, stats = policy_loss(lp, old, mb["advantages"], mask, clip_low=a.clip_ratio_low,
                                      clip_high=a.clip_ratio_high, dual_clip=a.dual_clip, agg=a.loss_agg,
                                      denominator=1.0)
            metrics = {"pg_clipfrac": stats["clipfrac"], "ppo_kl": stats["approx_kl"],
                       "dual_clipfrac": stats["dual_clipfrac"], "entropy": entropy_bonus(ent.detach(), mask)}
            if own:  # the diagnostics the Metrics stage reads from a separate pass (here: means over micro-batches)
                metrics["old_logprob_mean"] = _token_mean(old, mask)
                if "rollout_logprobs" in mb:
                    metrics["rollout_logprob_diff"] = _token_mean((old - mb["rollout_logprobs"]).abs(), mask)
                if "ref_logprobs" in mb:
                    metrics["kl_ref"] = _token_mean(kl_penalty(old, mb["ref_logprobs"], "low_var_kl"), mask)
            if a.entropy_coef:
                loss = loss - a.entropy_coef * entropy_bonus(ent, mask, a.loss_agg, denominator=1.0)
            if use_kl:
                kl = kl_loss(lp, mb["ref_logprobs"], mask, a.kl_estimator, a.loss_agg, denominator=1.0)
                loss = loss + ctx.kl_ctl.value * kl
                metrics["kl_loss"] = kl_loss(lp.detach(), mb["ref_logprobs"], mask, a.kl_estimator)
            return loss, metrics

        stats = engine.forward_backward(mbs, loss_fn, **self._normaliser(engine, mbs, a.loss_agg))
        stats.update(engine.optimizer_step())
        return stats

    def _critic_update(self, mbs: list[dict], ctx) -> dict[str, float]:
        a, engine = ctx.config.algorithm, ctx.critic_engine

        def loss_fn(values, mb):
            v = response_values(values, mb)
            loss, clipfrac = value_loss(v, mb["values"], mb["returns"], mb["loss_mask"], clip=a.value_clip,
                                        agg=a.loss_agg, denominator=1.0)
            return loss, {"vf_clipfrac": clipfrac, "values": _token_mean(v.detach(), mb["loss_mask"])}

        stats = engine.forward_backward(mbs, loss_fn, **self._normaliser(engine, mbs, a.loss_agg))
        stats.update(engine.optimizer_step())
        return stats


def _mean_dicts(dicts: list[dict], prefix: str) -> dict[str, float]:
    if not dicts:
        return {}
    return {prefix + k: sum(float(d[k]) for d in dicts) / len(dicts) for k in dicts[0]}


class Metrics(Stage):
    """Step metrics (rewards, lengths, KL, timings, throughput), averaged over data-parallel ranks.

    One name per quantity, in verl's naming style; the table of every key is in docs/metrics.md.
    The actor/ and critic/ loss, grad-norm and lr keys come from the Update stage.
    """

    name = "metrics"

    def __call__(self, batch: RLBatch, ctx) -> RLBatch:
        mask = batch.response_mask
        lengths = mask.sum(-1)
        m = batch.metrics
        m.update({
            "reward/mean": float(batch.scores.mean()),
            "reward/std": float(batch.scores.std()) if batch.num_rows > 1 else 0.0,
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
        })
        if "response_length/clip_ratio" not in m:  # a custom rollout stage: against rollout.max_new_tokens
            m["response_length/clip_ratio"] = clip_ratio(batch.response_mask, ctx.config.rollout.max_new_tokens)
        if batch.n > 1:  # rows of a prompt are consecutive: [prompts, n]; equal scores give GRPO/RLOO advantages 0
            groups = batch.scores.view(-1, batch.n)
            m["reward/uniform_groups"] = float((groups == groups[:, :1]).all(-1).float().mean())
        mask = batch.train_mask  # log-prob and KL statistics over the model's own tokens
        if batch.old_logprobs is not None:
            # how far the training forward is from the sampler (numerics, or a stale inference model)
            m["rollout/logprob_diff"] = _masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), mask)
            m["actor/old_logprob_mean"] = _masked_mean(batch.old_logprobs, mask)
        if batch.ref_logprobs is not None and batch.old_logprobs is not None:  # else from the update (own log-probs)
            m["actor/kl_ref"] = _masked_mean(kl_penalty(batch.old_logprobs, batch.ref_logprobs, "low_var_kl"), mask)
        if ctx.kl_ctl is not None:
            m["actor/kl_coef"] = float(ctx.kl_ctl.value)
        counts = {"reward/failures": float(batch.reward_failures), "reward/timeouts": float(batch.reward_timeouts),
                  "response_length/tokens": float(lengths.sum()),
                  "prompt_length/tokens": float(batch.attention_mask.sum() - lengths.sum())}
        batch.metrics = _reduce_over_dp(m, counts, ctx)
        batch.metrics.update(_timing_metrics(batch, ctx))
        return batch


def _reduce_over_dp(means: dict[str, float], sums: dict[str, float], ctx) -> dict[str, float]:
    """Average `means` and sum `sums` over the data-parallel group (same keys on every rank)."""
    layout = ctx.layout
    keys_m, keys_s = sorted(means), sorted(sums)
    if layout.dp > 1:
        t = torch.tensor([means[k] for k in keys_m] + [sums[k] for k in keys_s], dtype=torch.float64,
                         device=ctx.device)
        dist.all_reduce(t, group=layout.dp_group)
        vals = t.tolist()
        out = {k: v / layout.dp for k, v in zip(keys_m, vals)}
        out.update(dict(zip(keys_s, vals[len(keys_m):])))
        return out
    return {**means, **sums}


def _timing_metrics(batch: RLBatch, ctx) -> dict[str, float]:
    """Per-phase seconds and generated tokens per second per GPU (rank) of this step."""
    t = batch.timings
    out = {f"time/{k}": float(v) for k, v in t.items()}
    total = sum(v for k, v in t.items() if k not in ("generate", "reshard", "graph_capture"))  # inside "rollout"
    out["time/step"] = total
    world = ctx.layout.world_size
    generated = batch.metrics["response_length/tokens"]
    tokens = generated + batch.metrics["prompt_length/tokens"]
    out["throughput/tokens_per_s_per_gpu"] = tokens / max(total, 1e-9) / world
    if t.get("generate"):
        out["throughput/gen_tokens_per_s_per_gpu"] = generated / t["generate"] / world
    return out
