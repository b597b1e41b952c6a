"""`TrainerConfig`: the schema of an RL run (what `verl-mega train CONFIG.yaml key=value ...` reads).

Nested dataclasses, one section per concern, one-line doc per field; loaded with
`verl_mega.config.load_config(TrainerConfig, yaml, overrides)` (unknown keys are a ValueError naming
them). Presets are YAML files in `examples/configs/`. Batch sizes follow verl's units:
`rollout_batch_size` and `mini_batch_size` count prompts (each expands to `n_samples` responses),
`micro_batch_size` counts sequences (one forward/backward pass). All of them are per data-parallel
rank.

Simplification: no Hydra-style config groups; the reward is a rule (`"rule"`, by `data_source`) or a
`module:function` / `file.py:function` reference.
"""

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

ALGORITHMS = ("ppo", "gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
DTYPES = ("float32", "bfloat16")


@dataclass
class ModelSection:
    path: str = MISSING  # actor: a local Hugging Face directory (weights + tokenizer)
    critic_path: Optional[str] = None  # critic HF directory (PPO); None: the actor's weights with a new value head
    reference_path: Optional[str] = None  # reference policy HF directory (KL); None: a frozen copy of the actor
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 (masters and Adam states stay fp32)


@dataclass
class DataSection:
    train_path: str = MISSING  # prompts: verl-format .parquet or .jsonl (prompt, data_source, reward_model, extra_info)
    val_path: Optional[str] = None  # held-out prompts (not used by the RL loop itself)
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
    max_batch: int = 256  # most sequences decoded together (larger rollouts run in chunks)
    cuda_graph: bool = True  # capture decode steps in CUDA graphs (ignored on CPU)
    free_cache: bool = True  # free the KV cache (and CUDA graphs) after each rollout, leaving the memory to training


@dataclass
class AlgorithmSection:
    name: str = "grpo"  # advantage estimator: ppo (critic + GAE) | grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline
    gamma: float = 1.0  # discount (GAE, REINFORCE++)
    lam: float = 1.0  # GAE lambda
    norm_adv_by_std: bool = True  # GRPO: divide by the group std (False = Dr. GRPO)
    clip_ratio_low: float = 0.2  # PPO clip: ratio >= 1 - clip_ratio_low
    clip_ratio_high: float = 0.2  # PPO clip: ratio <= 1 + clip_ratio_high (0.28 = DAPO clip-higher)
    # dual-clip PPO bound c > 1 for negative advantages (e.g. 3.0); None = off. Porting a verl recipe: verl's
    # policy loss has dual-clip ON by default (actor clip_ratio_c = 3.0); set dual_clip: 3.0 to match it.
    dual_clip: Optional[float] = None
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean
    entropy_coef: float = 0.0  # entropy bonus coefficient in the actor loss
    kl_coef: float = 0.0  # KL-to-reference coefficient; > 0 builds the reference model
    kl_in_reward: bool = False  # True: subtract coef * KL from the rewards (PPO-RLHF); False: KL loss term (GRPO)
    kl_estimator: str = "low_var_kl"  # k1 | abs | mse | low_var_kl (k3)
    kl_target: Optional[float] = None  # adaptive KL controller target (in-reward KL only); None = fixed coef
    kl_horizon: float = 10000.0  # adaptive KL controller horizon (samples)
    value_clip: float = 0.2  # critic value clipping around the rollout values
    whiten_gae: bool = True  # whiten GAE advantages over the batch


@dataclass
class OptimSection:
    lr: float = 1e-6  # actor peak learning rate
    critic_lr: float = 1e-5  # critic peak learning rate (PPO)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only)
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr: float = 0.0  # cosine floor
    clip_grad: float = 1.0  # max global gradient norm (<= 0: no clipping)


@dataclass
class TrainerSection:
    rollout_batch_size: int = 8  # prompts per step (per data-parallel rank)
    mini_batch_size: Optional[int] = None  # prompts per optimizer step; None = the whole rollout batch
    micro_batch_size: int = 8  # sequences per forward/backward pass
    num_epochs: int = 1  # PPO epochs: passes over each rollout batch
    total_steps: int = 100  # RL steps of `verl-mega train`
    seed: int = 0  # seeds sampling, shuffling and mini-batch order
    output_dir: str = "outputs/run"  # metrics.jsonl, tensorboard/, checkpoints/
    log_every: int = 1  # write metrics every N steps
    tensorboard: bool = True  # also write TensorBoard scalars
    save_every: int = 0  # checkpoint every N steps (0 = only at the end, if save_final)
    save_final: bool = True  # checkpoint after the last step
    resume: bool = True  # resume from the latest checkpoint in output_dir/checkpoints if there is one
    reward: str = "rule"  # "rule" (GSM8K/MATH checkers by data_source) or "module:function" / "file.py:function"
    reward_timeout_s: float = 30.0  # per-response reward time limit (a timeout scores 0 and is counted)
    progress_bar: bool = True  # tqdm bar with live reward / KL (rank 0)


@dataclass
class ParallelSection:
    tp: int = 1  # tensor-parallel size of training
    pp: int = 1  # pipeline-parallel size of training
    tp_g: Optional[int] = None  # tensor-parallel size of generation (divides tp*pp; None = tp)


@dataclass
class TrainerConfig:
    """The whole run: `load_config(TrainerConfig, "examples/configs/gsm8k_grpo.yaml", ["optim.lr=1e-6"])`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)


def check_config(cfg: TrainerConfig) -> None:
    """ValueError naming the field for values the schema's types cannot rule out."""
    a, t, r = cfg.algorithm, cfg.trainer, cfg.rollout
    if a.name not in ALGORITHMS:
        raise ValueError(f"algorithm.name {a.name!r} is not one of {ALGORITHMS}")
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype {cfg.model.dtype!r} is not one of {DTYPES}")
    for name, value in (("trainer.rollout_batch_size", t.rollout_batch_size), ("trainer.micro_batch_size", t.micro_batch_size),
                        ("trainer.num_epochs", t.num_epochs), ("rollout.n_samples", r.n_samples),
                        ("rollout.max_new_tokens", r.max_new_tokens), ("parallel.tp", cfg.parallel.tp),
                        ("parallel.pp", cfg.parallel.pp)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if t.mini_batch_size is not None and not 1 <= t.mini_batch_size <= t.rollout_batch_size:
        raise ValueError(f"trainer.mini_batch_size={t.mini_batch_size} must be in [1, rollout_batch_size="
                         f"{t.rollout_batch_size}]")
    if a.name in ("grpo", "rloo") and r.n_samples < 2:
        raise ValueError(f"algorithm.name={a.name!r} compares samples of a prompt: rollout.n_samples must be >= 2, "
                         f"got {r.n_samples}")
    if r.temperature <= 0:
        raise ValueError(f"rollout.temperature must be > 0 for RL sampling, got {r.temperature}")
    if a.kl_coef < 0:
        raise ValueError(f"algorithm.kl_coef must be >= 0, got {a.kl_coef}")
