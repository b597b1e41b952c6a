"""PPOTrainer in one process: stages and `>>`, a reward that raises / hangs inside step(), GRPO
advantage wiring, metric names (documented, no duplicates, printed with 3 digits), config errors.
`verl-mega train` end to end: test_train_cli.py."""

import math
import os
import re
import time

import pytest
import torch

from verl_mega.config import load_config
from verl_mega.rollout.actor import get_actor_model
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer import PPOTrainer, Reward, RLBatch, Stage, TrainerConfig, default_pipeline
from verl_mega.trainer.config import check_config
from verl_mega.trainer.metrics import bar_postfix, format_metrics
from verl_mega.apps import train_cli

CHAT = [{"role": "user", "content": "What is 10*12?"}]
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "configs")
METRICS_DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "metrics.md")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=32, num_layers=2)


def undocumented(keys) -> set:
    """The metric keys without a row in docs/metrics.md (a row `prefix/<key>` documents every key under prefix/)."""
    rows = re.findall(r"^\| `([^`]+)` \|", open(METRICS_DOC).read(), flags=re.M)
    exact, prefixes = {r for r in rows if "<" not in r}, tuple(r.split("<")[0] for r in rows if "<" in r)
    return {k for k in keys if k not in exact and not k.startswith(prefixes)}


def test_reward_extra_keys_become_metrics(tiny_dir):
    """A reward's dict results' numeric extra keys: their means as reward/extra/<key> (a CombinedReward's parts)."""
    from verl_mega.rewards import CombinedReward

    def scored(response: str) -> dict:
        return {"score": float(len(response) % 2), "acc": 1.0, "note": "text is left out"}

    trainer = PPOTrainer(get_actor_model(tiny_dir), reward_fn=CombinedReward([scored, lambda r: 0.25], weights=[1, 2]),
                         rollout_batch_size=2, n_samples=2, max_new_tokens=4)
    m = trainer.step([{"prompt": CHAT}, {"prompt": "2+2="}])
    b = trainer.last_batch
    assert m["reward/extra/score_1"] == 0.25 and m["reward/extra/acc_0"] == 1.0
    assert abs(m["reward/extra/score_0"] - (b.scores - 0.5).mean().item()) < 1e-6  # total = part 0 + 2 x 0.25
    assert not any("note" in k for k in m) and not undocumented(m)


def _flaky_reward(response: str) -> float:
    """Raises on some responses, hangs on others, else scores the length parity."""
    if len(response) % 3 == 0:
        raise RuntimeError("reward bug")
    if len(response) % 3 == 1:
        time.sleep(5.0)
    return float(len(response) % 2)


def test_step_counts_failing_and_hanging_rewards(tiny_dir):
    torch.manual_seed(0)
    cfg = TrainerConfig()
    cfg.trainer.reward_timeout_s = 0.3
    trainer = PPOTrainer(get_actor_model(tiny_dir), reward_fn=_flaky_reward, rollout_batch_size=2, n_samples=8,
                         max_new_tokens=12, lr=1e-4, config=cfg)
    start = time.time()
    m = trainer.step([{"prompt": CHAT}, {"prompt": "2+2=", "ground_truth": "4"}])
    assert time.time() - start < 20
    lengths = [len(t) for t in trainer.last_batch.response_texts]
    assert m["reward/failures"] == sum(n % 3 == 0 for n in lengths)
    assert m["reward/timeouts"] == sum(n % 3 == 1 for n in lengths)
    assert m["reward/failures"] + m["reward/timeouts"] > 0  # 16 random responses: both kinds essentially always
    scores = trainer.last_batch.scores
    assert all(s == (n % 2 if n % 3 == 2 else 0.0) for s, n in zip(scores.tolist(), lengths))
    for key in ("actor/loss", "reward/mean", "actor/ppo_kl", "actor/entropy", "actor/pg_clipfrac", "actor/grad_norm",
                "actor/lr", "response_length/mean",
                "time/generate", "time/reshard", "time/logprob", "time/update"):
        assert math.isfinite(m[key]), key
    stages = {f"time/{name}" for name in trainer.pipeline.names()}
    assert not undocumented(set(m) - stages), undocumented(set(m) - stages)  # every key in docs/metrics.md
    assert not {"loss", "lr", "grad_norm", "kl", "clip_frac", "reward_mean", "entropy"} & set(m)  # no duplicates
    assert "actor/lr: 0.0001" in format_metrics(m) and set(bar_postfix(m)) == {"reward", "kl", "ent", "len"}
    # rollout engine and training forward agree on the sampled tokens' log-probs
    assert m["rollout/logprob_diff"] < 1e-4
    # GRPO: advantages are the group-normalised scores on every response token
    b = trainer.last_batch
    g = b.scores.view(-1, 8)
    expect = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
    torch.testing.assert_close(b.advantages, expect[:, None] * b.response_mask, atol=1e-5, rtol=1e-5)
    assert m["reward/uniform_groups"] == (g == g[:, :1]).all(1).float().mean().item()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_groups_with_equal_rewards_train_on_with_zero_advantages(tiny_dir, algorithm):
    cfg = TrainerConfig()
    cfg.algorithm.name = algorithm
    trainer = PPOTrainer(get_actor_model(tiny_dir), reward_fn=lambda r: 1.0, rollout_batch_size=2, n_samples=2,
                         max_new_tokens=4, config=cfg)
    for _ in range(2):  # the run goes on
        m = trainer.step([{"prompt": CHAT}, {"prompt": "2+2="}])
        assert all(math.isfinite(v) for v in m.values()), {k: v for k, v in m.items() if not math.isfinite(v)}
        assert m["reward/uniform_groups"] == 1.0 and m["advantage/max"] == m["advantage/min"] == 0.0
        assert m["actor/grad_norm"] == 0.0  # no signal, no update (the std of a uniform group is 0, not NaN)


def test_every_response_truncated_is_counted(tiny_dir):
    trainer = PPOTrainer(get_actor_model(tiny_dir), reward_fn=lambda r: float(len(r)), rollout_batch_size=2,
                         n_samples=2, max_new_tokens=1)  # one token: no response can stop before the limit
    m = trainer.step([{"prompt": CHAT}, {"prompt": "2+2="}])
    assert m["response_length/clip_ratio"] == 1.0 and m["response_length/max"] == 1.0
    assert all(math.isfinite(v) for v in m.values())


def test_pipeline_composition_and_custom_stage(tiny_dir):
    trainer = PPOTrainer(get_actor_model(tiny_dir), reward_fn=lambda r: 0.0, rollout_batch_size=1, n_samples=2,
                         max_new_tokens=4)
    assert trainer.pipeline.names() == ["rollout", "reward", "logprob", "advantage", "update", "metrics"]

    def constant_reward(batch: RLBatch, ctx) -> RLBatch:  # a plain function replacing a stage
        batch.scores = torch.arange(batch.num_rows, dtype=torch.float32)
        return batch

    trainer.pipeline = default_pipeline(trainer).replace("reward", constant_reward)
    m = trainer.step([{"prompt": "hello"}])
    assert m["reward/mean"] == pytest.approx(0.5) and trainer.global_step == 1
    assert trainer.pipeline.names()[1] == "constant_reward"
    assert (Reward(trainer.rewards) >> constant_reward).names() == ["reward", "constant_reward"]
    assert (constant_reward >> Reward(trainer.rewards)).names() == ["constant_reward", "reward"]

    class Broken(Stage):
        name = "broken"

        def __call__(self, batch, ctx):
            return None

    trainer.pipeline = trainer.pipeline >> Broken()
    with pytest.raises(ValueError, match="broken"):
        trainer.step([{"prompt": "hello"}])
    with pytest.raises(ValueError, match="no stage named"):
        default_pipeline(trainer).replace("rewards", constant_reward)
    with pytest.raises(ValueError, match="neither 'prompt' nor 'prompt_ids'"):
        trainer.step([{"question": "hi"}])


def test_config_presets_and_errors(tmp_path):
    for name in ("gsm8k_grpo", "gsm8k_ppo", "demo_grpo", "tool_grpo"):
        cfg = load_config(TrainerConfig, os.path.join(CONFIGS, f"{name}.yaml"), ["model.path=/m", "data.train_path=/d"])
        assert cfg.algorithm.name in ("grpo", "ppo")
        check_config(cfg)
        if name.startswith("gsm8k"):  # the GPU recipes leave the token budgets to the memory plan
            assert cfg.trainer.max_tokens_per_micro_batch == cfg.trainer.logprob_max_tokens_per_micro_batch == "auto"
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  path: /m\ndata:\n  train_path: /d\n")
    with pytest.raises(ValueError, match="trainer.rollout_batchsize"):
        train_cli.parse_config([str(y), "trainer.rollout_batchsize=4"])
    with pytest.raises(ValueError, match="algorithm.name"):
        train_cli.parse_config([str(y), "algorithm.name=dpo"])
    with pytest.raises(ValueError, match="n_samples must be >= 2"):
        train_cli.parse_config([str(y), "rollout.n_samples=1"])


def test_a_reference_with_another_vocabulary_is_refused(tiny_dir, tmp_path):
    # The stages check the batch's ids against the actor's vocabulary once, on the host: a reference (or critic)
    # with another vocabulary would read ids it does not have, so the trainer refuses it where it is built.
    other = make_tiny_hf_model(str(tmp_path / "other"), vocab_size=96, hidden_size=32, num_layers=2,
                               with_tokenizer=False)
    with pytest.raises(ValueError, match="the reference has a vocabulary of 96 tokens and the actor 128"):
        PPOTrainer(get_actor_model(tiny_dir), reward_fn=lambda r: 1.0, reference=other, kl_coef=0.1,
                   rollout_batch_size=2, n_samples=2, max_new_tokens=4)


def test_a_deleted_trainer_frees_its_models(tiny_dir):
    """Nothing outlives a trainer (a sweep or a benchmark builds several in one process): once it and its actor are
    deleted, the actor's, the reference's and the critic's parameters are freed (gc, no hidden strong reference).
    On CPU, and with CUDA also on the GPU (the rollout engine's CUDA graphs and their memory pool)."""
    import gc
    import weakref
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        cfg = TrainerConfig()
        cfg.algorithm.name, cfg.algorithm.kl_coef = "ppo", 0.01  # a critic and a reference model too
        actor = get_actor_model(tiny_dir, device=device)
        trainer = PPOTrainer(actor, reward_fn=lambda r: float(len(r) % 2), rollout_batch_size=2, n_samples=2,
                             max_new_tokens=4, config=cfg)
        trainer.step([{"prompt": CHAT}, {"prompt": "2+2="}])
        models = {"actor": actor.model, "reference": trainer.reference.model, "critic": trainer.critic_engine.model}
        refs = {name: weakref.ref(next(m.parameters())) for name, m in models.items()}
        del actor, trainer, models
        gc.collect()
        assert {name: r() is None for name, r in refs.items()} == {name: True for name in refs}, device
