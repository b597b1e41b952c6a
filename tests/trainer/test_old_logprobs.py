"""trainer.old_logprobs: an on-policy update takes the old log-probs from its own forward (no separate pass before
it) and trains as the separate pass does; anything off-policy keeps the pass."""

import pytest
import torch

from verl_mega.rollout.actor import get_actor_model
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer import PPOTrainer, TrainerConfig, default_pipeline
from verl_mega.trainer.config import update_takes_own_logprobs
from verl_mega.trainer.stages import LogProbs

PROMPTS = [{"prompt": "2+2="}, {"prompt": "hello"}]
LR = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=32, num_layers=2)


def _trainer(tiny_dir, old_logprobs: str, packing: bool = True, **trainer_fields) -> PPOTrainer:
    cfg = TrainerConfig()
    cfg.trainer.old_logprobs, cfg.trainer.packing, cfg.trainer.micro_batch_size = old_logprobs, packing, 8
    for key, value in trainer_fields.items():
        setattr(cfg.trainer, key, value)
    cfg.algorithm.kl_coef = 0.05  # a KL loss to a reference model (GRPO style): kl_ref is reported either way
    return PPOTrainer(get_actor_model(tiny_dir), reward_fn=lambda r: float(len(r) % 3), rollout_batch_size=2,
                      n_samples=2, max_new_tokens=6, lr=LR, config=cfg)


def test_which_updates_take_their_own_logprobs():
    cfg = TrainerConfig()
    assert update_takes_own_logprobs(cfg)  # the defaults: one epoch over the whole batch
    for section, key, value in [("trainer", "old_logprobs", "recompute"), ("trainer", "num_epochs", 2),
                                ("trainer", "mini_batch_size", 4), ("algorithm", "critic_warmup", 2)]:
        changed = TrainerConfig()
        setattr(getattr(changed, section), key, value)
        assert not update_takes_own_logprobs(changed), (section, key, value)
    in_reward = TrainerConfig()
    in_reward.algorithm.kl_coef, in_reward.algorithm.kl_in_reward = 0.1, True  # the rewards need them first
    assert not update_takes_own_logprobs(in_reward)
    whole = TrainerConfig()
    whole.trainer.mini_batch_size = whole.trainer.rollout_batch_size
    assert update_takes_own_logprobs(whole)


@pytest.mark.parametrize("packing", [True, False])
def test_own_logprobs_train_as_the_separate_pass(tiny_dir, packing):
    own, separate = _trainer(tiny_dir, "auto", packing), _trainer(tiny_dir, "recompute", packing)
    assert repr(own.pipeline.stages[2]) == "LogProbs(reference, critic)"
    assert repr(separate.pipeline.stages[2]) == "LogProbs(actor, reference, critic)"
    m_own, m_sep = own.step(PROMPTS), separate.step(PROMPTS)  # same seed, same weights: the same rollout
    assert m_own["reward/mean"] == m_sep["reward/mean"] and m_own["response_length/mean"] == m_sep["response_length/mean"]
    # the ratio is exactly 1 with own log-probs; within fp32 rounding of it with the separate pass
    assert m_own["actor/pg_clipfrac"] == 0.0 and m_own["actor/ppo_kl"] == 0.0
    assert abs(m_sep["actor/ppo_kl"]) < 1e-6
    # one micro-batch per pass: the update's means are the Metrics stage's token means
    for key in ("actor/loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm", "actor/old_logprob_mean",
                "actor/kl_ref", "rollout/logprob_diff"):
        assert m_own[key] == pytest.approx(m_sep[key], rel=1e-5, abs=1e-6), key
    # Adam's first step moves each parameter by about lr x sign(grad): equal up to the sign of a gradient at the
    # rounding level, which can move a parameter 2 x lr the other way
    for (name, p), q in zip(own.actor.model.named_parameters(), separate.actor.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2 * LR, msg=name)
    assert sum((p - q).abs().gt(1e-7).sum().item() for p, q in
               zip(own.actor.model.parameters(), separate.actor.model.parameters())) == 0


def test_a_batch_without_old_logprobs_needs_an_on_policy_update(tiny_dir):
    trainer = _trainer(tiny_dir, "auto", num_epochs=2)  # two epochs: the separate pass runs
    assert repr(trainer.pipeline.stages[2]) == "LogProbs(actor, reference, critic)"
    assert trainer.step(PROMPTS)["actor/ppo_kl"] != 0.0  # the second epoch's ratio moved
    t = trainer
    no_old = LogProbs(t.actor_engine, t.reference, t.critic_engine, t.layout, temperature=t.config.rollout.temperature,
                      trainer_cfg=t.config.trainer, device=t.device, old=False)
    trainer.pipeline = default_pipeline(trainer).replace("logprob", no_old)
    with pytest.raises(ValueError, match="not on-policy"):
        trainer.step(PROMPTS)
