"""`PPOTrainer`: PPO / GRPO / RLOO / REINFORCE++ on an `HFActor`, one RL step = one pass of the stage pipeline.

    actor = get_actor_model("path/to/hf_dir")
    trainer = PPOTrainer(actor=actor, reward_fn=lambda response: float("120" in response),
                         rollout_batch_size=1, num_epochs=1)
    metrics = trainer.step([{"prompt": [{"role": "user", "content": "What is 10*12?"}]}])
    trainer.fit(get_dataloader("train.parquet", actor.tokenizer, 8), steps=100)

The step reads like the algorithm:

    self.pipeline = rollout >> reward >> logprobs >> Advantage() >> Update() >> Metrics()   # default_pipeline(self)

Every rank runs the same code (SPMD): one plain python process on CPU, or torchrun with the actor
loaded under a (tp, pp, dp) layout (`get_actor_model(path, tensor_parallel_size=..., ...)`, or the
config's `parallel` section when `actor` is a path). Keyword arguments override the matching
fields of `config` (a `TrainerConfig`). `batch` / dataloader batches are this data-parallel rank's
prompts.

Roles: the critic (PPO only) is the actor's HF directory with a value head, in its own TrainEngine;
the reference (only when kl_coef > 0) is a frozen copy of the actor. Reference: verl's
`RayPPOTrainer.fit` (single-controller) rewritten as an SPMD loop of named stages (HybridFlow).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable

import torch.distributed as dist

from verl_mega.algorithms.kl import AdaptiveKLController, FixedKLController
from verl_mega.data import get_dataloader
from verl_mega.kernels import warm_up_logprob_kernels
from verl_mega.models.hf_io import check_hf_dir, weight_map
from verl_mega.models.parallelize import apply_compile, apply_recompute, apply_sequence_parallel
from verl_mega.rewards.base import RewardFailureGuard, RewardFunction, RuleBasedReward
from verl_mega.rollout.actor import HFActor, get_actor_model
from verl_mega.rollout.agent_loop import AgentLimits
from verl_mega.rollout.frontend import encode_prompts, stop_ids
from verl_mega.rollout.frontend import release as release_generation
from verl_mega.tools import Tool, ToolSet, build_tools
from verl_mega.trainer import checkpointing
from verl_mega.trainer.batch import ImageTokens, RLBatch, sample_images
from verl_mega.trainer.config import TrainerConfig, check_config, update_takes_own_logprobs
from verl_mega.trainer.engine import TrainEngine
from verl_mega.trainer.memory_plan import auto_token_budgets, plan_for_config
from verl_mega.trainer.metrics import MetricsLogger, bar_postfix, progress_bar, run_banner
from verl_mega.trainer.reward_runner import RewardRunner
from verl_mega.trainer.optim import OptimConfig
from verl_mega.trainer.roles import FrozenModel, build_critic, build_reference
from verl_mega.trainer.stages import Advantage, LogProbs, Metrics, Pipeline, Reward, Rollout, Update, stage_name
from verl_mega.trainer.validation import Validator, actor_generate_fn, agent_generate_fn
from verl_mega.trainer.vision_data import image_processor_for

log = logging.getLogger("verl_mega.trainer")

# PPOTrainer keyword -> (config section, field)
_KWARG_FIELDS = {
    "rollout_batch_size": ("trainer", "rollout_batch_size"), "num_epochs": ("trainer", "num_epochs"),
    "micro_batch_size": ("trainer", "micro_batch_size"), "mini_batch_size": ("trainer", "mini_batch_size"),
    "algorithm": ("algorithm", "name"), "kl_coef": ("algorithm", "kl_coef"), "n_samples": ("rollout", "n_samples"),
    "max_new_tokens": ("rollout", "max_new_tokens"), "temperature": ("rollout", "temperature"), "lr": ("optim", "lr"),
}


def default_pipeline(trainer: "PPOTrainer") -> Pipeline:
    """rollout >> reward >> logprob >> advantage >> update >> metrics; rollout, reward and logprob are built
    with what they use (the rollout worker and config section, the reward runner, the engines)."""
    cfg = trainer.config
    rollout = Rollout(trainer.worker, cfg.rollout, seed=cfg.trainer.seed, tokenizer=trainer.tokenizer,
                      pad_id=trainer.pad_id, dp_rank=trainer.layout.dp_rank,
                      rewards=trainer.rewards if cfg.rollout.stream_rewards else None, tools=trainer.tools,
                      width_multiple=1 if cfg.trainer.packing else cfg.trainer.pad_to_multiple_of)
    logprobs = LogProbs(trainer.actor_engine, trainer.reference, trainer.critic_engine, trainer.layout,
                        temperature=cfg.rollout.temperature, trainer_cfg=cfg.trainer, device=trainer.device,
                        old=not update_takes_own_logprobs(cfg))
    return rollout >> Reward(trainer.rewards) >> logprobs >> Advantage() >> Update() >> Metrics()


class PPOTrainer:
    """RL trainer over named dataflow stages (see module docstring); `.pipeline` may be replaced.

    Args:
        actor: an `HFActor` (from `get_actor_model`) or a HF directory path (loaded with config.parallel).
        reward_fn: `fn(response) -> float` or verl's `compute_score(data_source, solution_str, ground_truth,
            extra_info)`; default: the GSM8K/MATH rule checkers by `data_source`.
        critic: PPO critic: an `HFActor` loaded with value_head=True, a HF path, or None (the actor's weights).
        reference: reference policy for the KL term: an `HFActor`, a HF path, or None (a frozen copy of the actor).
        tools: multi-turn tool use (`rollout/agent_loop.py`): a `verl_mega.tools.ToolSet` or a list of `Tool`s;
            None = config rollout.tools (`build_tools` specs), empty = single-turn.
        config: a `TrainerConfig`; the other keywords override its fields when given (not None).
    """

    def __init__(self, actor: HFActor | str, reward_fn: Callable | None = None, *, rollout_batch_size: int | None = None,
                 num_epochs: int | None = None, algorithm: str | None = None, n_samples: int | None = None,
                 critic=None, reference=None, lr: float | None = None, kl_coef: float | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 micro_batch_size: int | None = None, mini_batch_size: int | None = None,
                 tools=None, config: TrainerConfig | None = None):
        cfg = copy.deepcopy(config) if config is not None else TrainerConfig()
        given = dict(rollout_batch_size=rollout_batch_size, num_epochs=num_epochs, algorithm=algorithm,
                     n_samples=n_samples, lr=lr, kl_coef=kl_coef, max_new_tokens=max_new_tokens,
                     temperature=temperature, micro_batch_size=micro_batch_size, mini_batch_size=mini_batch_size)
        for key, value in given.items():
            if value is not None:
                section, name = _KWARG_FIELDS[key]
                setattr(getattr(cfg, section), name, value)
        if isinstance(actor, (str, os.PathLike)):
            actor = get_actor_model(actor, torch_dtype=cfg.model.dtype, tensor_parallel_size=cfg.parallel.tp,
                                    pipeline_parallel_size=cfg.parallel.pp)
        if not isinstance(actor, HFActor):
            raise ValueError(f"actor must be an HFActor (get_actor_model) or a HF directory path, got {type(actor).__name__}")
        cfg.model.path = actor.path
        cfg.parallel.tp, cfg.parallel.pp = actor.layout.tp, actor.layout.pp
        if cfg.trainer.mini_batch_size is not None:
            cfg.trainer.mini_batch_size = min(cfg.trainer.mini_batch_size, cfg.trainer.rollout_batch_size)
        check_config(cfg)
        self.config, self.actor, self.layout = cfg, actor, actor.layout
        self.device = actor.device
        self.tokenizer = actor.tokenizer
        self.eos_ids, self.pad_id = stop_ids(actor)
        # before the training state is allocated: token budgets (auto), then print the plan, fail early if it cannot
        # fit, pick offload (auto)
        t = cfg.trainer
        t.max_tokens_per_micro_batch, t.logprob_max_tokens_per_micro_batch = auto_token_budgets(
            cfg, actor.config, self.layout, self.device, actor.dtype.itemsize)
        self.offload, self.memory_plan = plan_for_config(cfg, actor.config, self.layout, self.device,
                                                         actor.dtype.itemsize)
        self.actor_engine = TrainEngine(actor.model, self.layout, self._optim(cfg.optim), param_dtype=actor.dtype,
                                        offload_optimizer=self.offload.optimizer)
        self.free_cache = not self.memory_plan.keep_kv_cache  # the config's, or the planner's choice (auto)
        self.worker = actor.rollout_worker(tp_g=cfg.parallel.tp_g, engine_config=cfg.rollout.engine,
                                           free_cache=self.free_cache)
        self.reference = self._reference(reference) if cfg.algorithm.kl_coef > 0 else None
        self.critic_engine = self._critic(critic) if cfg.algorithm.name in ("ppo", "gae") else None
        apply_recompute(self.actor_engine.model, cfg.model.recompute, cfg.model.recompute_layers)
        if self.critic_engine is not None:
            apply_recompute(self.critic_engine.model, cfg.model.critic_recompute or cfg.model.recompute,
                            cfg.model.recompute_layers)
        for role, engine in (("reference", self.reference), ("critic", self.critic_engine)):
            if engine is not None and engine.model.true_vocab_size != actor.model.true_vocab_size:
                raise ValueError(f"the {role} has a vocabulary of {engine.model.true_vocab_size} tokens and the actor "
                                 f"{actor.model.true_vocab_size}: they read the same token ids (one tokenizer)")
        for engine in (self.actor_engine, self.reference, self.critic_engine):
            if engine is not None:
                apply_sequence_parallel(engine.model, cfg.parallel.sequence_parallel)
                apply_compile(engine.model, cfg.model.compile)
        if self.actor_engine.model.has_head:  # the log-prob kernels' variants compile now, not inside a step
            warm_up_logprob_kernels(self.actor_engine.model.output_weight())
        self.reward_fn = RewardFunction(reward_fn if reward_fn is not None else RuleBasedReward())
        self.reward_guard = RewardFailureGuard(cfg.trainer.reward_fail_threshold, cfg.trainer.reward_fail_steps)
        self.rewards = RewardRunner(self.reward_fn, self.layout, timeout_s=cfg.trainer.reward_timeout_s,
                                    max_workers=cfg.rollout.reward_workers)
        self.tools = self._tools(tools)
        a = cfg.algorithm
        self.kl_ctl = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target and a.kl_in_reward
                       else FixedKLController(a.kl_coef)) if a.kl_coef > 0 else None
        self.pipeline = default_pipeline(self)
        if self.offload.grads:  # rollout/train hand-over: training state off the GPU while generating
            rollout = next(s for s in self.pipeline.stages if stage_name(s) == "rollout")
            self.pipeline = self.pipeline.replace("rollout", TrainingStateOffloaded(rollout))
        self.global_step = 0  # RL steps done
        self.val_history: list[dict[str, float]] = []  # {"step": k, "val/...": ...} per validation run by fit()

    # ------------------------------------------------------------------ construction helpers
    def _optim(self, optim: OptimConfig, epochs: int | None = None) -> OptimConfig:
        """`optim` with its cosine horizon derived when unset: optimizer steps of the whole run
        (mini-batches x `epochs` (None: trainer.num_epochs) x RL steps)."""
        t = self.config.trainer
        if optim.total_steps is not None:
            return optim
        updates = (epochs or t.num_epochs) * -(-t.rollout_batch_size // (t.mini_batch_size or t.rollout_batch_size))
        return dataclasses.replace(optim, total_steps=t.total_steps * updates)

    def _tools(self, tools) -> ToolSet | None:
        """The rollout's ToolSet: `tools` (a ToolSet or a list of Tools) or config rollout.tools; None = single-turn."""
        r = self.config.rollout
        if tools is None:
            return build_tools(r.tools, timeout_s=r.tool_timeout_s, key="rollout.tools") if r.tools else None
        if isinstance(tools, ToolSet):
            return tools
        if isinstance(tools, (list, tuple)) and all(isinstance(t, Tool) for t in tools):
            return ToolSet(list(tools), timeout_s=r.tool_timeout_s)
        raise ValueError(f"tools must be a ToolSet or a list of verl_mega.tools.Tool, got {type(tools).__name__}")

    def _reference(self, reference) -> FrozenModel:
        if isinstance(reference, HFActor):
            return FrozenModel(reference.model, self.layout, offload=self.offload.reference)
        return build_reference(self.actor, reference or self.config.model.reference_path,
                               offload=self.offload.reference)

    def _critic(self, critic) -> TrainEngine:
        optim = self._optim(self.config.critic_optim, self.config.trainer.critic_epochs)
        if isinstance(critic, HFActor):
            if not critic.model.is_value_model:
                raise ValueError("critic must be loaded with value_head=True (get_actor_model(path, value_head=True))")
            return TrainEngine(critic.model, self.layout, optim, param_dtype=critic.dtype,
                               offload_optimizer=self.offload.optimizer)
        path = critic or self.config.model.critic_path or self.actor.path
        if path is None:
            raise ValueError("PPO needs a critic: pass critic= (an HFActor with value_head=True or a HF directory), "
                             "or an actor loaded from a HF directory to initialise it from")
        new_head = "score.weight" not in weight_map(check_hf_dir(path))  # an LM directory: its value head is new
        return build_critic(self.actor, optim, path, value_head_std=self.config.model.value_head_std if new_head else None,
                            offload_optimizer=self.offload.optimizer)

    # ------------------------------------------------------------------ one step
    def make_batch(self, samples: list[dict]) -> RLBatch:
        """An RLBatch from samples: dataset items (with `prompt_ids`) or dicts with `prompt` (text or chat messages;
        for a VLM with `images` too: paths, {"bytes"} / {"path"} entries or PIL images, one `<image>` marker each)."""
        if not samples:
            raise ValueError("step() needs at least one sample")
        samples = [self._encode_images(i, s) for i, s in enumerate(samples)]
        prompts = []
        for i, s in enumerate(samples):
            if not isinstance(s, dict):
                raise ValueError(f"sample {i} must be a dict with 'prompt' (or 'prompt_ids'), got {type(s).__name__}")
            if "prompt_ids" in s:
                prompts.append(list(s["prompt_ids"]))
            elif "prompt" in s:
                if self.tokenizer is None:
                    raise ValueError(f"the actor at {self.actor.path} has no tokenizer: give samples 'prompt_ids'")
                prompts += encode_prompts(self.tokenizer, [s["prompt"]])
            else:
                raise ValueError(f"sample {i} has neither 'prompt' nor 'prompt_ids'; keys: {sorted(s)}")
        longest = max(len(p) for p in prompts)
        if longest > self.config.data.max_prompt_length:
            raise ValueError(f"a prompt has {longest} tokens > data.max_prompt_length={self.config.data.max_prompt_length}")
        pixel_values, grids = sample_images(samples)  # a VLM's images (dataset items of data/multimodal.py)
        image_tokens = ImageTokens.from_config(self.actor.config)
        if pixel_values is not None and image_tokens is None:
            raise ValueError(f"the samples carry images but the actor at {self.actor.path} is a text model")
        return RLBatch(samples=list(samples), prompt_ids=prompts, n=self.config.rollout.n_samples,
                       step=self.global_step, pixel_values=pixel_values, image_grid_thw=grids,
                       image_tokens=image_tokens)

    def _encode_images(self, i: int, sample):
        """A user sample with `images` (and a `prompt`, no `prompt_ids`) with its prompt encoded by the actor's
        processor (`data.multimodal.encode_vision_prompt`: prompt_ids, pixel_values, image_grid_thw added);
        any other sample as given."""
        wanted = isinstance(sample, dict) and sample.get("images") and "prompt" in sample
        if not wanted or "prompt_ids" in sample:
            return sample
        from verl_mega.data.multimodal import encode_vision_prompt

        options = self._image_options()
        if not options or self.tokenizer is None:
            raise ValueError(f"sample {i} has images but the actor at {self.actor.path} is not a vision-language "
                             f"model with a processor (tokenizer + preprocessor_config.json)")
        prompt = sample["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        try:
            encoded = encode_vision_prompt(self.tokenizer, options["image_processor"], messages, sample["images"])
        except ValueError as exc:
            raise ValueError(f"sample {i}: {exc}") from None
        return {**sample, **encoded}

    def step(self, samples: list[dict]) -> dict[str, float]:
        """One RL step on this rank's prompts (every data-parallel rank passes the same number); returns the
        metrics, the same on every rank."""
        self._check_same_prompt_count(len(samples))
        batch = self.pipeline(self.make_batch(samples), self)
        self.global_step += 1
        if "actor/reward_kl_penalty" in batch.metrics and self.kl_ctl is not None:
            self.kl_ctl.update(batch.metrics["actor/reward_kl_penalty"], batch.num_rows)
        if batch.reward_failures or batch.reward_timeouts:
            log.warning("step %d: %d reward failures, %d timeouts; first: %s", self.global_step,
                        batch.reward_failures, batch.reward_timeouts, (batch.reward_errors or ["?"])[0])
        self.last_batch = batch
        self.reward_guard.update(*self._failed_reward_calls(batch), batch.reward_errors)
        return dict(batch.metrics)

    def _failed_reward_calls(self, batch: RLBatch) -> tuple[int, int]:
        """(failed or timed-out reward calls, calls) of the step: the Metrics stage's counts summed over
        data-parallel ranks (so every rank takes the same decision); this rank's if the pipeline has no Metrics."""
        m = batch.metrics
        if "reward/failures" in m:
            return int(m["reward/failures"] + m["reward/timeouts"]), batch.num_rows * self.layout.dp
        return batch.reward_failures + batch.reward_timeouts, batch.num_rows

    def _check_same_prompt_count(self, count: int) -> None:
        """Every rank must step on the same number of prompts (the stages' collectives assume it);
        a mismatch is a clear error here rather than a collective timeout later."""
        if self.layout.world_size == 1:
            return
        counts = [None] * self.layout.world_size
        dist.all_gather_object(counts, count)
        if len(set(counts)) > 1:
            raise ValueError(f"trainer.step: ranks passed different numbers of prompts {counts}; every rank "
                             f"(each data-parallel rank, and every tp/pp rank of a replica) must pass the same number")

    # ------------------------------------------------------------------ the loop
    def fit(self, dataloader: Iterable[list[dict]], steps: int | None = None, *, output_dir: str | None = None,
            save_every: int | None = None, resume: bool | None = None,
            val_dataloader: Iterable[list[dict]] | None = None) -> list[dict[str, float]]:
        """Run RL steps over `dataloader` (re-iterated epoch after epoch) until `steps` (default
        config.trainer.total_steps) steps are done; logs metrics (JSONL, TensorBoard, tqdm), saves
        checkpoints every `save_every` steps (and at the end), resumes from the latest checkpoint.
        Rank 0 prints a banner (model, layout, algorithm, dataset size, steps, output), "resuming from
        <dir> at step N", or "run already finished ..." when there is nothing left to do.
        Raises RewardFailureError when the reward fails too often (trainer.reward_fail_threshold / _steps).
        Validates on `val_dataloader` (default: data.val_path, if set) before the first step
        (trainer.val_before_train), every trainer.val_every steps and after the last one; the `val/`
        metrics join that step's record (step 0 for the first) and `self.val_history`.
        Returns the metrics of the steps run by this call."""
        t = self.config.trainer
        validator = self._validator(val_dataloader)
        steps = t.total_steps if steps is None else steps
        output_dir = output_dir or t.output_dir
        save_every = t.save_every if save_every is None else save_every
        ckpt_root = os.path.join(output_dir, "checkpoints")
        rank0 = self.layout.rank == 0
        if (t.resume if resume is None else resume) and checkpointing.latest_checkpoint(ckpt_root):
            saved = checkpointing.saved_layout(ckpt_root)
            self.load_checkpoint(ckpt_root, dataloader)
            now = {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}
            moved = (f" (saved at {' '.join(f'{k}={v}' for k, v in saved.items())}, resharded to "
                     f"{' '.join(f'{k}={v}' for k, v in now.items())})") if saved and saved != now else ""
            if rank0:
                print(f"[verl-mega] resuming from {os.path.abspath(ckpt_root)} at step {self.global_step}{moved}",
                      flush=True)
        if self.global_step >= steps:
            if rank0:
                print(f"[verl-mega] run already finished at step {self.global_step} (trainer.total_steps={steps}); "
                      f"nothing to do; raise trainer.total_steps or use a new trainer.output_dir", flush=True)
            return []
        if rank0:
            dataset = getattr(dataloader, "dataset", None)
            print(run_banner(self.config, self.layout, len(dataset) if dataset is not None else None, steps,
                             output_dir, self.global_step, getattr(dataset, "filtered", 0)), flush=True)
        logger = MetricsLogger(output_dir, enabled=rank0, tensorboard=t.tensorboard, resume_step=self.global_step)
        bar = progress_bar(steps, self.global_step, rank0 and t.progress_bar)
        history = []
        try:
            if validator is not None and t.val_before_train and self.global_step < steps:
                logger.log(self.global_step, self._validate(validator))
            while self.global_step < steps:
                ran = False
                for samples in dataloader:
                    ran = True
                    metrics = self.step(samples)
                    if validator is not None and ((t.val_every and self.global_step % t.val_every == 0)
                                                  or self.global_step >= steps):
                        metrics.update(self._validate(validator))
                    history.append(metrics)
                    if self.global_step % t.log_every == 0 or any(k.startswith("val/") for k in metrics):
                        logger.log(self.global_step, metrics)
                    bar.set_postfix(bar_postfix(metrics))
                    bar.update(1)
                    if save_every and self.global_step % save_every == 0:
                        self.save_checkpoint(ckpt_root, dataloader)
                    if self.global_step >= steps:
                        break
                if not ran:
                    raise ValueError("the dataloader yielded no batch")
            if t.save_final and history and not (save_every and self.global_step % save_every == 0):
                self.save_checkpoint(ckpt_root, dataloader)
        finally:
            bar.close()
            logger.close()
        return history

    # ------------------------------------------------------------------ validation
    def make_validator(self, val_dataloader: Iterable[list[dict]]) -> Validator:
        """A `Validator` on this actor's rollout engine (trainer.val_temperature, val_n_samples; the rollout's
        max_new_tokens, top_k, top_p) and the run's reward, over `val_dataloader` (this rank's share)."""
        r, t = self.config.rollout, self.config.trainer
        if self.tools is not None:  # held-out samples call the tools as training's do
            generate = agent_generate_fn(self.worker, self.tokenizer, self.tools, AgentLimits.from_rollout_config(r),
                                         temperature=t.val_temperature, n=t.val_n_samples, top_k=r.top_k,
                                         top_p=r.top_p, seed=t.seed)
        else:
            generate = actor_generate_fn(self.actor, max_new_tokens=r.max_new_tokens, temperature=t.val_temperature,
                                         n=t.val_n_samples, top_k=r.top_k, top_p=r.top_p, seed=t.seed)
        return Validator(generate, self.reward_fn, val_dataloader, n_samples=t.val_n_samples,
                         dp_group=self.layout.dp_group if self.layout.dp > 1 else None, timeout_s=t.reward_timeout_s)

    def _validator(self, val_dataloader) -> Validator | None:
        """The validator of fit(): over `val_dataloader`, else data.val_path's prompts, else None (no validation)."""
        t, d = self.config.trainer, self.config.data
        if not (t.val_every or t.val_before_train):
            return None
        if val_dataloader is None and d.val_path:
            val_dataloader = get_dataloader(d.val_path, self.tokenizer, t.val_batch_size, shuffle=False, drop_last=False,
                                            dp_rank=self.layout.dp_rank, dp_size=self.layout.dp,
                                            prompt_key=d.prompt_key, max_prompt_length=d.max_prompt_length,
                                            apply_chat_template=d.apply_chat_template,
                                            **self._image_options())
        return self.make_validator(val_dataloader) if val_dataloader is not None else None

    def _image_options(self) -> dict:
        """Dataset keywords for the actor's images: a VLM's image processor (loaded once), {} for a text model."""
        if not hasattr(self, "_image_processor"):
            self._image_processor = image_processor_for(self.actor.path, self.actor.config)
        return {} if self._image_processor is None else {"image_processor": self._image_processor}

    def _validate(self, validator: Validator) -> dict[str, float]:
        metrics = validator()
        # always: validation batches may have grown the engine's KV cache beyond what the memory plan keeps
        release_generation(self.actor)
        self.val_history.append({"step": self.global_step, **metrics})
        if self.layout.rank == 0:
            log.info("validation at step %d: %s", self.global_step,
                     ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, root: str, dataloader=None) -> str:
        """Save actor (+ critic) engine states, the step, the KL coefficient and the dataloader position
        under `root` (actor/step_N, critic/step_N); collective. Returns the actor checkpoint directory."""
        return checkpointing.save(self, root, dataloader)

    def load_checkpoint(self, root: str, dataloader=None) -> int | None:
        """Restore the newest checkpoint under `root` (any layout: DCP reshards); returns its step or None."""
        return checkpointing.load(self, root, dataloader)


class TrainingStateOffloaded:
    """Runs a stage (the rollout) with the actor's and critic's training-only state moved off the GPU
    (`TrainEngine.offload_training_state`), brought back afterwards; keeps the stage's name."""

    def __init__(self, stage):
        self.stage, self.name = stage, stage_name(stage)

    def __call__(self, batch, ctx):
        engines = [e for e in (ctx.actor_engine, ctx.critic_engine) if e is not None]
        for engine in engines:
            engine.offload_training_state()
        try:
            return self.stage(batch, ctx)
        finally:
            for engine in engines:
                engine.reload_training_state()
