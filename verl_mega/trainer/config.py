"""`TrainerConfig`: the schema of an RL run (what `verl-mega train CONFIG.yaml key=value ...` reads).

Nested dataclasses, one section per concern, one-line doc per field (the `# ...` comment, from which
docs/config.md is generated: `python -m verl_mega.apps.config_docs`); loaded with
`verl_mega.config.load_config(TrainerConfig, yaml, overrides)` (unknown keys are a ValueError naming
them). Presets are YAML files in `examples/configs/`. Batch sizes follow verl's units:
`rollout_batch_size` and `mini_batch_size` count prompts (each expands to `n_samples` responses),
`micro_batch_size` counts sequences (one forward/backward pass). All of them are per data-parallel
rank.

Simplification: no Hydra-style config groups; the reward is a rule (`"rule"`, by `data_source`), a
`module:function` / `file.py:function` reference, a reward model (`"model:PATH"`) or an LLM judge
(`"judge:PATH"`).
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from omegaconf import MISSING

from verl_mega.models.parallelize import RECOMPUTE_MODES as RECOMPUTE
from verl_mega.rollout.engine_config import EngineConfig
from verl_mega.trainer.optim import CriticOptimConfig, OptimConfig

ALGORITHMS = ("ppo", "gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
DTYPES = ("float32", "bfloat16")
OLD_LOGPROBS = ("auto", "recompute")  # trainer.old_logprobs


@dataclass
class ModelSection:
    path: str = MISSING  # actor: a local Hugging Face directory (weights + tokenizer)
    critic_path: Optional[str] = None  # critic HF directory (PPO): a saved critic keeps its value head, an LM directory gets a new one (value_head_std); None: the actor's weights
    reference_path: Optional[str] = None  # reference policy HF directory (KL); None: a frozen copy of the actor
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 (masters and Adam states stay fp32)
    value_head_std: float = 0.0  # std of the critic's new value head (0 = zeros: V starts at 0, no noise in early advantages)
    recompute: str = "none"  # actor activation recompute: none | selective (attention core + MLP activation; keeps ~80% of a layer's activations eager, ~70% compiled) | full (whole layers; keeps only each layer's input)
    recompute_layers: Optional[int] = None  # full recompute: only the first K layers of each pipeline stage; None = all
    critic_recompute: Optional[str] = None  # critic activation recompute (same choices); None = as the actor
    compile: bool = False  # torch.compile each decoder layer's parts before and after the attention core in the training-side passes (update, log-probs, reference, critic): fused norms / RoPE / SwiGLU; the attention core and generation stay eager (generation: CUDA graphs)


@dataclass
class DataSection:
    train_path: str = MISSING  # prompts: verl-format .parquet or .jsonl (prompt, data_source, reward_model, extra_info)
    val_path: Optional[str] = None  # held-out prompts for validation (trainer.val_every); same format as train_path
    prompt_key: str = "prompt"  # column with the chat messages (or a plain string)
    max_prompt_length: int = 512  # longer prompts are dropped (and counted)
    apply_chat_template: bool = True  # render chat prompts with the tokenizer's template (plain text if False)
    shuffle: bool = True  # shuffle prompts every epoch (seeded)


@dataclass
class RolloutSection:
    n_samples: int = 4  # responses generated per prompt (the GRPO/RLOO group size)
    max_new_tokens: int = 256  # response length limit
    temperature: float = 1.0  # sampling temperature (also used for the training log-probs)
    top_k: int = 0  # top-k sampling (0 = off)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    engine: EngineConfig = field(default_factory=EngineConfig)  # generation engine sizes (rollout.engine.max_batch, ...)
    free_cache: Optional[bool] = None  # free the KV cache after each rollout, leaving the memory to training (the paged decode's CUDA graphs stay); null: freed, except with the gather decode attention (whose graphs a freed cache would invalidate) where the memory plan shows training fits beside it
    stream_rewards: bool = True  # score each response as soon as it finishes (reward time overlaps generation)
    reward_workers: int = 32  # concurrent reward calls (threads)
    tools: List[Any] = field(default_factory=list)  # multi-turn tool use: verl_mega.tools.build_tools specs ([{name: code_interpreter}]); empty = single-turn
    max_turns: int = 4  # assistant turns per sample with tools
    max_total_tokens: Optional[int] = None  # response tokens per sample with tools (model + tool results); null = max_new_tokens
    tool_timeout_s: float = 30.0  # wall-clock limit of one tool call


@dataclass
class AlgorithmSection:
    name: str = "grpo"  # advantage estimator: ppo (critic + GAE) | grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline
    gamma: float = 1.0  # discount (GAE, REINFORCE++)
    lam: float = 1.0  # GAE lambda
    norm_adv_by_std: bool = True  # GRPO: divide by the group std (False = Dr. GRPO)
    clip_ratio_low: float = 0.2  # PPO clip: ratio >= 1 - clip_ratio_low
    clip_ratio_high: float = 0.2  # PPO clip: ratio <= 1 + clip_ratio_high (0.28 = DAPO clip-higher)
    dual_clip: Optional[float] = None  # dual-clip PPO bound c > 1 for negative advantages; None = off. verl has it ON by default (clip_ratio_c = 3.0): set 3.0 to match a verl recipe
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean
    entropy_coef: float = 0.0  # entropy bonus coefficient in the actor loss
    kl_coef: float = 0.0  # KL-to-reference coefficient; > 0 builds the reference model
    kl_in_reward: bool = False  # True: subtract coef * KL from the rewards (PPO-RLHF); False: KL loss term (GRPO)
    kl_estimator: str = "low_var_kl"  # k1 | abs | mse | low_var_kl (k3)
    kl_target: Optional[float] = None  # adaptive KL controller target (in-reward KL only); None = fixed coef
    kl_horizon: float = 10000.0  # adaptive KL controller horizon (samples)
    value_clip: Optional[float] = 0.2  # critic value clipping around the rollout values (None = unclipped)
    critic_warmup: int = 0  # RL steps that train only the critic before the actor moves (verl's trainer.critic_warmup)
    whiten_gae: bool = True  # whiten GAE advantages over the batch


@dataclass
class TrainerSection:
    rollout_batch_size: int = 8  # prompts per step (per data-parallel rank)
    mini_batch_size: Optional[int] = None  # prompts per optimizer step (must divide `rollout_batch_size`); None = the whole rollout batch
    micro_batch_size: int = 8  # sequences per forward/backward pass (when max_tokens_per_micro_batch is None)
    max_tokens_per_micro_batch: Optional[Union[int, str]] = None  # token budget of a forward/backward pass (sequences grouped by length); None = micro_batch_size sequences; "auto" (packing): the largest power of two (1024..65536, not below one whole sequence) whose memory plan fits 80% of the GPU, picked when the trainer is built
    logprob_micro_batch_size: Optional[int] = None  # sequences per forward-only pass (old and reference log-probs, critic values; no activations kept, so it can be larger); None = micro_batch_size (verl's log_prob_micro_batch_size_per_gpu)
    logprob_max_tokens_per_micro_batch: Optional[Union[int, str]] = None  # token budget of a forward-only pass; None = max_tokens_per_micro_batch (verl's log_prob_max_token_len_per_gpu); "auto" (packing): as max_tokens_per_micro_batch's, not below it
    packing: bool = True  # pack each micro-batch's valid tokens into one row (varlen attention, no padding); False = padded rows
    pad_to_multiple_of: int = 1  # packing off: pad each batch's sequence width (prompt + longest response) up to a multiple of this
    num_epochs: int = 1  # PPO epochs: passes over each rollout batch
    critic_epochs: Optional[int] = None  # critic passes over each rollout batch (None = num_epochs; verl's critic.ppo_epochs)
    old_logprobs: str = "auto"  # auto: an on-policy update (one epoch over one mini-batch, no KL in the reward, no critic warm-up) takes its own forward's log-probs, detached, as the old ones (ratio exactly 1), saving a forward pass over the batch; recompute: always a separate old-log-prob pass before the update
    total_steps: int = 100  # RL steps of `verl-mega train`
    seed: int = 0  # seeds sampling, shuffling and mini-batch order
    output_dir: str = "outputs/run"  # metrics.jsonl, tensorboard/, checkpoints/
    log_every: int = 1  # write metrics every N steps
    tensorboard: bool = True  # also write TensorBoard scalars
    save_every: int = 0  # checkpoint every N steps (0 = only at the end, if save_final)
    save_final: bool = True  # checkpoint after the last step
    keep_last: int = 3  # newest checkpoints kept in output_dir/checkpoints (older step_N deleted); 0 = keep all
    resume: bool = True  # resume from the latest checkpoint in output_dir/checkpoints if there is one
    reward: str = "rule"  # "rule" (GSM8K/MATH), "module:fn" / "file.py:fn", "model:PATH" (reward model), "judge:PATH"
    reward_offload: bool = False  # model / judge rewards: keep their weights in CPU memory between reward calls
    judge_template: Optional[str] = None  # judge:PATH rewards: the judge's prompt, a format string with {response} and optionally {prompt}, {ground_truth}; null = LLMJudgerReward's default
    judge_parse: Optional[str] = None  # judge:PATH rewards: how a verdict becomes a score ("0-10", "0-1" or "yes/no"); null = LLMJudgerReward's default
    judge_max_new_tokens: Optional[int] = None  # judge:PATH rewards: verdict length limit in tokens; null = LLMJudgerReward's default
    reward_timeout_s: float = 30.0  # per-response reward time limit (a timeout scores 0 and is counted); also bounds importing a module:fn / file.py:fn reward
    reward_fail_threshold: float = 1.0  # a step is "failed" when this fraction of its reward calls failed or timed out
    reward_fail_steps: int = 3  # stop with an error after this many failed steps in a row (0 = never stop)
    progress_bar: bool = True  # tqdm bar with live reward / KL (rank 0)
    val_every: int = 0  # validate on data.val_path every N RL steps and after the last (0 = not during training)
    val_before_train: bool = True  # validate before the first step (with val_every = 0: before the first and after the last)
    val_n_samples: int = 1  # responses per validation prompt (val/reward_mean averages them)
    val_temperature: float = 0.0  # validation sampling temperature (0 = greedy)
    val_batch_size: int = 256  # validation prompts generated together (per data-parallel rank)


@dataclass
class ParallelSection:
    tp: int = 1  # tensor-parallel size of training
    pp: int = 1  # pipeline-parallel size of training
    tp_g: Optional[int] = None  # tensor-parallel size of generation (divides tp*pp; None = tp)
    sequence_parallel: bool = False  # Megatron sequence parallelism for tp > 1 (norms/residuals sharded along the sequence)


@dataclass
class OffloadConfig:
    optimizer: bool = False  # fp32 master weights + Adam moments in host memory, AdamW step on the CPU
    reference: bool = False  # reference policy layers in host memory, streamed to the GPU layer by layer
    grads: bool = False  # during rollout, move gradients (and on-GPU optimizer state) to the host for the KV cache
    auto: bool = False  # the planner picks the three switches above (fewest that fit; needs CUDA or memory_gib)
    memory_gib: Optional[float] = None  # device memory to plan against; None: CUDA's free memory (no check on CPU)
    plan: bool = True  # run the memory planner at construction: table on rank 0, early error if it cannot fit


@dataclass
class TrainerConfig:
    """The whole run: `load_config(TrainerConfig, "examples/configs/gsm8k_grpo.yaml", ["optim.lr=1e-6"])`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: CriticOptimConfig = field(default_factory=CriticOptimConfig)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    offload: OffloadConfig = field(default_factory=OffloadConfig)


MODEL_REWARDS = ("model", "judge")  # trainer.reward "model:PATH" (reward model) / "judge:PATH" (LLM judge)


def model_reward(reward: str) -> tuple[str, str] | None:
    """(kind, PATH) of a trainer.reward naming a model ("model:PATH" or "judge:PATH"; PATH may be empty: the
    caller names the error), None for any other reward."""
    kind, _, path = reward.partition(":")
    return (kind, path) if kind in MODEL_REWARDS else None


def update_takes_own_logprobs(cfg: TrainerConfig) -> bool:
    """Whether the update takes the old log-probs from its own forward (`trainer.old_logprobs: auto` on an
    on-policy update) instead of a separate pass before it. On-policy: one epoch over one mini-batch, so the
    update's forward runs on the weights the rollout sampled from, exactly what the separate pass would
    compute; no KL in the reward (the Advantage stage needs the old log-probs before the update); no critic
    warm-up (whose steps do not update the actor)."""
    t, a = cfg.trainer, cfg.algorithm
    one_mini_batch = t.mini_batch_size is None or t.mini_batch_size >= t.rollout_batch_size
    return (t.old_logprobs == "auto" and t.num_epochs == 1 and one_mini_batch
            and not (a.kl_coef > 0 and a.kl_in_reward) and a.critic_warmup == 0)


def micro_batch_sizes(trainer_cfg, forward_only: bool = False) -> tuple[int, int | None]:
    """(sequences, token budget or None) per micro-batch of a training pass, or with `forward_only` of a
    forward-only pass (trainer.logprob_micro_batch_size / logprob_max_tokens_per_micro_batch, each defaulting to
    the training value)."""
    t = trainer_cfg
    size, max_tokens = t.micro_batch_size, t.max_tokens_per_micro_batch
    if forward_only:
        size = t.logprob_micro_batch_size or size
        max_tokens = t.logprob_max_tokens_per_micro_batch or max_tokens
    return size, max_tokens


def check_config(cfg: TrainerConfig) -> None:
    """ValueError naming the field for values the schema's types cannot rule out."""
    a, t, r = cfg.algorithm, cfg.trainer, cfg.rollout
    if a.name not in ALGORITHMS:
        raise ValueError(f"algorithm.name {a.name!r} is not one of {ALGORITHMS}")
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of {DTYPES}")
    for name, value in (("model.recompute", cfg.model.recompute), ("model.critic_recompute", cfg.model.critic_recompute)):
        if value is not None and value not in RECOMPUTE:
            raise ValueError(f"{name} {value!r} is not one of {RECOMPUTE}")
    for name, value in (("trainer.rollout_batch_size", t.rollout_batch_size), ("trainer.micro_batch_size", t.micro_batch_size),
                        ("trainer.num_epochs", t.num_epochs), ("trainer.critic_epochs", 1 if t.critic_epochs is None else t.critic_epochs),
                        ("rollout.n_samples", r.n_samples),
                        ("rollout.max_new_tokens", r.max_new_tokens), ("parallel.tp", cfg.parallel.tp),
                        ("parallel.pp", cfg.parallel.pp), ("trainer.log_every", t.log_every),
                        ("trainer.pad_to_multiple_of", t.pad_to_multiple_of),
                        ("trainer.total_steps", t.total_steps)):  # 0 would end at once saying "already finished"
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if cfg.model.recompute_layers is not None and cfg.model.recompute_layers < 0:
        raise ValueError(f"model.recompute_layers must be >= 0 or null, got {cfg.model.recompute_layers}")
    for key in ("max_tokens_per_micro_batch", "logprob_max_tokens_per_micro_batch"):
        value = getattr(t, key)
        if value == "auto" and not t.packing:  # a padded micro-batch's memory follows its longest row, not a budget
            raise ValueError(f"trainer.{key}=auto needs trainer.packing=true")
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"trainer.{key} must be a token count, auto or null, got {value!r}")
    for key in ("max_tokens_per_micro_batch", "logprob_micro_batch_size", "logprob_max_tokens_per_micro_batch"):
        value = getattr(t, key)
        if value is not None and value != "auto" and value < 1:
            raise ValueError(f"trainer.{key} must be >= 1 or null, got {value}")
    if t.mini_batch_size is not None and (t.mini_batch_size < 1 or t.rollout_batch_size % t.mini_batch_size):
        # a short last mini-batch would be one optimizer step on fewer samples, weighted like a full one
        raise ValueError(f"trainer.mini_batch_size={t.mini_batch_size} must be >= 1 and divide "
                         f"trainer.rollout_batch_size={t.rollout_batch_size}")
    if a.name in ("grpo", "rloo") and r.n_samples < 2:
        raise ValueError(f"algorithm.name={a.name!r} compares samples of a prompt: rollout.n_samples must be >= 2, "
                         f"got {r.n_samples}")
    for key, value, low in (("max_turns", r.max_turns, 1), ("max_total_tokens", r.max_total_tokens, 1)):
        if value is not None and value < low:
            raise ValueError(f"rollout.{key} must be >= {low}, got {value}")
    if r.tool_timeout_s <= 0:
        raise ValueError(f"rollout.tool_timeout_s must be > 0, got {r.tool_timeout_s}")
    if r.tools and r.max_turns < 2:  # the calls of a sample's last turn are not run
        raise ValueError(f"rollout.max_turns={r.max_turns} with rollout.tools: a sample ends after its first turn, so "
                         f"no tool call would ever run; set rollout.max_turns >= 2 (a call, then the answer)")
    if r.temperature <= 0:
        raise ValueError(f"rollout.temperature must be > 0 for RL sampling, got {r.temperature}")
    cfg.optim.check("optim")
    cfg.critic_optim.check("critic_optim")
    if a.critic_warmup < 0:
        raise ValueError(f"algorithm.critic_warmup must be >= 0, got {a.critic_warmup}")
    if a.value_clip is not None and a.value_clip <= 0:
        raise ValueError(f"algorithm.value_clip must be > 0 or null (unclipped), got {a.value_clip}")
    if cfg.model.value_head_std < 0:
        raise ValueError(f"model.value_head_std must be >= 0, got {cfg.model.value_head_std}")
    for name, value, low in (("trainer.save_every", t.save_every, 0), ("trainer.keep_last", t.keep_last, 0),
                             ("trainer.reward_fail_steps", t.reward_fail_steps, 0), ("trainer.val_every", t.val_every, 0),
                             ("trainer.val_n_samples", t.val_n_samples, 1),
                             ("trainer.val_batch_size", t.val_batch_size, 1),
                             ("trainer.val_temperature", t.val_temperature, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if t.reward_timeout_s <= 0:
        raise ValueError(f"trainer.reward_timeout_s must be > 0, got {t.reward_timeout_s}")
    judge_set = [k for k in ("judge_template", "judge_parse", "judge_max_new_tokens") if getattr(t, k) is not None]
    named = model_reward(t.reward)
    if judge_set and (named is None or named[0] != "judge"):
        raise ValueError(f"trainer.{judge_set[0]} is set but trainer.reward={t.reward!r} is not an LLM judge "
                         f"(trainer.reward=judge:PATH)")
    if t.judge_max_new_tokens is not None and t.judge_max_new_tokens < 1:
        raise ValueError(f"trainer.judge_max_new_tokens must be >= 1 or null, got {t.judge_max_new_tokens}")
    if t.old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"trainer.old_logprobs {t.old_logprobs!r} is not one of {OLD_LOGPROBS}")
    if a.kl_coef < 0:
        raise ValueError(f"algorithm.kl_coef must be >= 0, got {a.kl_coef}")
    if cfg.offload.memory_gib is not None and cfg.offload.memory_gib <= 0:
        raise ValueError(f"offload.memory_gib must be positive, got {cfg.offload.memory_gib}")
