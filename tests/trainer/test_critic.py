"""The PPO critic as the trainer feeds it: which state's value each response token gets, and where its
value head comes from.

- `batch.values[:, t]` (the LogProbs stage, padded and packed micro-batches) is V(state before response
  token t), verl's `values[:, -R-1:-1]`: changing response token t leaves values 0..t unchanged and
  changes value t+1 (the decoder is causal, so that pins the column exactly);
- a critic built from another language-model directory (`model.critic_path`, no `score.*` tensors) gets
  a new value head set by `model.value_head_std` (zeros by default); a critic directory saved with its
  value head keeps it.
"""

import pytest
import torch

from verl_mega.rollout import get_actor_model
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer import PPOTrainer, TrainerConfig
from verl_mega.trainer.batch import RLBatch


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=32, num_layers=2)


def _ppo_trainer(actor_dir: str, packing: bool, **model_fields) -> PPOTrainer:
    cfg = TrainerConfig()
    cfg.trainer.packing = packing
    for name, value in model_fields.items():
        setattr(cfg.model, name, value)
    return PPOTrainer(get_actor_model(actor_dir), reward_fn=lambda r: 0.0, algorithm="ppo", rollout_batch_size=2,
                      n_samples=2, max_new_tokens=4, micro_batch_size=4, config=cfg)


def _values(trainer: PPOTrainer, responses: list[list[int]]) -> torch.Tensor:
    """batch.values [4, R] from the trainer's own LogProbs stage for two prompts x two given responses."""
    batch = RLBatch(samples=[{}, {}], prompt_ids=[[2, 40, 41], [2, 50]], n=2)
    batch.set_rollout(responses, [[0.0] * len(r) for r in responses], pad_id=trainer.pad_id)
    (logprob,) = [s for s in trainer.pipeline.stages if getattr(s, "name", "") == "logprob"]
    return logprob(batch, trainer).values


@pytest.mark.parametrize("packing", [False, True])
def test_value_of_response_token_t_is_the_state_before_it(tiny_dir, packing):
    torch.manual_seed(0)
    trainer = _ppo_trainer(tiny_dir, packing, value_head_std=1.0)  # a non-zero head: values vary with the input
    responses = [[10, 11, 12, 13], [14, 15, 16], [17, 18, 19, 20], [21, 22]]
    base = _values(trainer, responses)
    assert base.shape == (4, 4) and base[0].unique().numel() == 4
    for t in range(3):
        changed = [list(r) for r in responses]
        changed[0][t] = 30 + t
        v = _values(trainer, changed)
        assert torch.equal(v[0, :t + 1], base[0, :t + 1]), f"value of a state before token {t} saw token {t}"
        assert not torch.equal(v[0, t + 1], base[0, t + 1]), f"the state after token {t} did not see it"
        assert torch.equal(v[1:], base[1:])  # other rows untouched


def test_critic_path_lm_directory_gets_a_new_head_and_a_saved_critic_keeps_its_own(tiny_dir, tmp_path):
    other = make_tiny_hf_model(str(tmp_path / "other"), hidden_size=32, num_layers=2, seed=5)
    torch.manual_seed(0)
    trainer = _ppo_trainer(tiny_dir, True, critic_path=other)
    head = trainer.critic_engine.model.value_head
    assert float(head.weight.detach().abs().sum()) == 0.0 and float(head.bias.detach().abs().sum()) == 0.0
    # the trunk is the other directory's, not the actor's
    critic_embed = trainer.critic_engine.model.embed_tokens.weight.detach()
    assert not torch.equal(critic_embed, trainer.actor_engine.model.embed_tokens.weight.detach())
    with torch.no_grad():
        head.weight.fill_(0.5)
        head.bias.fill_(0.25)
    saved = tmp_path / "critic"
    critic = get_actor_model(other, value_head=True)
    critic.model.load_state_dict(trainer.critic_engine.model.state_dict())
    critic.save_hf(str(saved))
    reloaded = _ppo_trainer(tiny_dir, True, critic_path=str(saved)).critic_engine.model.value_head
    assert torch.all(reloaded.weight == 0.5) and torch.all(reloaded.bias == 0.25)
