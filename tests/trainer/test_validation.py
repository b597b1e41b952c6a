"""Validation during RL (`Validator`, `PPOTrainer.fit` val hooks) and the PPO critic's set-up: zero value
head, critic warm-up (the actor does not move), explained variance / value error / advantage statistics."""

import json
import math

import pytest
import torch

from verl_mega.data.loader import PADDING_KEY
from verl_mega.rollout import get_actor_model
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer import PPOTrainer, TrainerConfig
from verl_mega.trainer.stages import advantage_stats, critic_diagnostics
from verl_mega.trainer.validation import Validator, actor_generate_fn


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=32, num_layers=2)


def _rows(k: int) -> list[dict]:
    return [{"prompt_ids": [2, 5 + i], "ground_truth": str(i % 3)} for i in range(k)]


def _match(solution_str, ground_truth):
    return float(solution_str == ground_truth)


def test_validator_metrics_from_a_known_generate():
    # generate answers i % 3 for even prompts ("right") and "x" for odd ones: accuracy = half of the responses
    def generate(prompt_ids):
        return [str((p[1] - 5) % 3) if (p[1] - 5) % 2 == 0 else "x" for p in prompt_ids for _ in range(2)]

    batches = [_rows(6)[:4], _rows(6)[4:]]
    m = Validator(generate, _match, batches, n_samples=2)()
    assert m["val/num_prompts"] == 6 and m["val/accuracy"] == 0.5 and m["val/reward_mean"] == 0.5
    assert m["val/response_chars"] == 1.0 and m["val/reward_failures"] == 0
    # non-binary scores: no accuracy, the mean still reported
    m = Validator(lambda ids: ["ab"] * len(ids), lambda s: 0.25 * len(s), batches)()
    assert "val/accuracy" not in m and m["val/reward_mean"] == 0.5
    with pytest.raises(ValueError, match="n_samples=2"):
        Validator(lambda ids: ["a"] * len(ids), _match, batches, n_samples=2)()
    # a loader's padding copy (a one-row set on 2 dp ranks: rank 1 repeats it) is generated but not counted
    one = _rows(1)
    m = Validator(lambda ids: ["0"] * len(ids), _match, [one + [{**one[0], PADDING_KEY: True}]])()
    assert m["val/num_prompts"] == 1 and m["val/reward_mean"] == 1.0


def test_validator_scores_a_batched_reward_with_its_samples():
    """A BatchedReward (LLM judge, reward model, CombinedReward) scores the held-out batch with score_batch on its
    samples. It was called per response without the sample: a judge failed on every held-out response ("needs the
    prompt text": val/reward_failures = all, val/reward_mean 0) and a combination lost the ground truth."""
    from verl_mega.rewards import CombinedReward

    right = lambda ids: [str((p[1] - 5) % 3) for p in ids]  # noqa: E731
    m = Validator(right, CombinedReward([_match], weights=[2.0]), [_rows(6)])()
    assert m["val/reward_mean"] == 2.0 and m["val/reward_failures"] == 0 and "val/accuracy" not in m


def test_fit_validates_before_every_n_and_at_the_end(tiny_dir, tmp_path):
    torch.manual_seed(0)
    actor = get_actor_model(tiny_dir)
    cfg = TrainerConfig()
    cfg.trainer.output_dir, cfg.trainer.save_final, cfg.trainer.tensorboard = str(tmp_path), False, False
    cfg.trainer.val_every, cfg.trainer.progress_bar = 2, False
    trainer = PPOTrainer(actor, reward_fn=_match, rollout_batch_size=2, n_samples=2, max_new_tokens=2, lr=1e-4,
                         config=cfg)
    val = [_rows(5)]
    train = [[{"prompt": "ab", "ground_truth": "1"}, {"prompt": "cd", "ground_truth": "2"}]]
    history = trainer.fit(train, steps=3, val_dataloader=val)
    assert [v["step"] for v in trainer.val_history] == [0, 2, 3]
    assert "val/accuracy" in history[1] and "val/accuracy" not in history[0] and "val/accuracy" in history[2]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and "val/reward_mean" in records[0]
    # the final validation is the greedy accuracy of the trained actor, recomputed here directly
    texts = actor_generate_fn(actor, max_new_tokens=2)([r["prompt_ids"] for r in val[0]])
    direct = sum(_match(t, r["ground_truth"]) for t, r in zip(texts, val[0])) / len(texts)
    assert trainer.val_history[-1]["val/accuracy"] == direct


def test_critic_diagnostics_hand_case():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 9.0], [0.0, 9.0, 9.0]])  # valid: 1, 1, 0 -> mean 2/3, var 2/9
    values = torch.tensor([[1.0, 0.5, 9.0], [0.5, 9.0, 9.0]])  # errors 0, 0.5, -0.5 -> var 1/6, mse 1/6
    d = critic_diagnostics(values, returns, mask)
    assert math.isclose(d["critic/explained_variance"], 1 - (1 / 6) / (2 / 9), rel_tol=1e-9)
    assert math.isclose(d["critic/value_error"], 1 / 6, rel_tol=1e-9)
    s = advantage_stats(returns, mask)
    assert (s["advantage/max"], s["advantage/min"]) == (1.0, 0.0) and math.isclose(s["advantage/mean"], 2 / 3, rel_tol=1e-7)  # float32 mean


def test_ppo_critic_zero_head_and_warmup_keep_the_actor_still(tiny_dir, tmp_path):
    torch.manual_seed(0)
    actor = get_actor_model(tiny_dir)
    cfg = TrainerConfig()
    cfg.algorithm.critic_warmup = 1
    cfg.critic_optim.lr = 1e-3
    trainer = PPOTrainer(actor, reward_fn=lambda r: float(len(r) % 2), algorithm="ppo", rollout_batch_size=2,
                         n_samples=4, max_new_tokens=4, lr=1e-3, config=cfg)
    head = trainer.critic_engine.model.value_head
    assert float(head.weight.detach().abs().sum()) == 0.0 and float(head.bias.detach().abs().sum()) == 0.0
    before = [p.detach().clone() for p in actor.model.parameters()]
    samples = [{"prompt": "ab"}, {"prompt": "cd"}]
    m = trainer.step(samples)  # step 0 < critic_warmup: critic only
    assert all(torch.equal(a, b) for a, b in zip(before, actor.model.parameters()))
    assert "actor/loss" not in m and "critic/loss" in m
    assert m["critic/values_mean"] == 0.0  # the zero head predicts 0 before its first update
    for key in ("critic/explained_variance", "critic/value_error", "advantage/std", "advantage/max"):
        assert key in m, key
    m = trainer.step(samples)  # now the actor moves too
    assert "actor/loss" in m and not all(torch.equal(a, b) for a, b in zip(before, actor.model.parameters()))


@pytest.mark.parametrize("field, value, match", [
    ("trainer.val_every", -1, "trainer.val_every"), ("trainer.val_n_samples", 0, "trainer.val_n_samples"),
    ("algorithm.critic_warmup", -2, "algorithm.critic_warmup"), ("algorithm.value_clip", 0.0, "algorithm.value_clip"),
    ("model.value_head_std", -0.1, "model.value_head_std"), ("critic_optim.schedule", "cos", "critic_optim"),
    ("trainer.critic_epochs", 0, "trainer.critic_epochs"), ("trainer.total_steps", 0, "trainer.total_steps must be >= 1"),
    ("trainer.save_every", -2, "trainer.save_every"), ("trainer.log_every", 0, "trainer.log_every"),
    ("trainer.reward_timeout_s", 0.0, "trainer.reward_timeout_s"), ("trainer.reward_fail_steps", -1, "reward_fail_steps"),
    ("trainer.mini_batch_size", 3, "must be >= 1 and divide trainer.rollout_batch_size=8"),
    ("trainer.mini_batch_size", 0, "trainer.mini_batch_size")])
def test_new_fields_reject_bad_values(field, value, match):
    from verl_mega.trainer.config import check_config

    cfg = TrainerConfig()
    cfg.model.path = "/m"
    section, name = field.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match=match):
        check_config(cfg)


def _dp2_validation(hf_dir: str) -> dict:
    """Rank body: dp=2, each rank validates its share of 6 prompts through PPOTrainer.make_validator."""
    from verl_mega.data import get_dataloader
    from verl_mega.parallel.layout import Layout

    layout = Layout.create(tp=1, pp=1)
    actor = get_actor_model(hf_dir, layout=layout)
    trainer = PPOTrainer(actor, reward_fn=_match, rollout_batch_size=1, n_samples=2, max_new_tokens=2)
    rows = _rows(6)
    loader = get_dataloader(rows, None, 2, shuffle=False, drop_last=False, dp_rank=layout.dp_rank, dp_size=layout.dp)
    metrics = trainer.make_validator(loader)()
    texts = actor_generate_fn(actor, max_new_tokens=2)([r["prompt_ids"] for r in rows])  # every prompt, this rank
    return {"metrics": metrics, "direct": sum(_match(t, r["ground_truth"]) for t, r in zip(texts, rows)) / len(rows)}


def test_validation_sums_over_data_parallel_ranks(tiny_dir):
    from verl_mega.testing.multiprocess import run_distributed

    results = run_distributed(_dp2_validation, 2, tiny_dir, timeout_s=300)
    assert results[0]["metrics"] == results[1]["metrics"]  # the whole set's metrics on every rank
    m = results[0]["metrics"]
    assert m["val/num_prompts"] == 6 and m["val/accuracy"] == results[0]["direct"]
