"""PPOTrainer on 2 gloo ranks (as under torchrun): PPO (critic + GAE, in-reward adaptive KL) and GRPO
(KL loss) run 2 steps at tp=2 and at pp=2 with finite metrics that agree on every rank; a run
checkpointed after step 1 (fit + save_every) and resumed in a fresh trainer reproduces step 2.

One spawn runs everything; the tests assert on its results. Resume tolerance: relative 1e-6
(the restored fp32 weights, optimizer state, data position and sampling seeds are identical)."""

import math

import pytest
import torch.distributed as dist

from verl_mega.data import get_dataloader
from verl_mega.rollout.actor import get_actor_model
from verl_mega.parallel import Layout
from verl_mega.testing import run_distributed
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer import PPOTrainer, TrainerConfig

SAMPLES = [{"prompt": [{"role": "user", "content": "What is 10*12?"}], "ground_truth": "120"},
           {"prompt": "Count: 1 2 3", "ground_truth": "4"}]
KEYS = ("actor/loss", "reward/mean", "actor/kl_ref", "actor/entropy", "actor/pg_clipfrac", "actor/grad_norm",
        "response_length/mean")


def _reward(response: str) -> float:
    return float(sum(c in "0123456789 " for c in response)) / max(1, len(response))


def _trainer(hf_dir: str, layout, algorithm: str) -> PPOTrainer:
    """PPO: critic + GAE, in-reward KL with an adaptive coefficient; GRPO: KL loss. 2 mini-batches x 2 epochs."""
    cfg = TrainerConfig()
    a, t = cfg.algorithm, cfg.trainer
    if algorithm == "ppo":
        a.kl_coef, a.kl_in_reward, a.kl_target, a.kl_estimator, a.dual_clip = 0.02, True, 0.01, "k1", 3.0
    else:
        a.kl_coef, a.clip_ratio_high, a.entropy_coef = 0.05, 0.28, 0.01
    t.progress_bar, t.save_final = False, False
    return PPOTrainer(get_actor_model(hf_dir, layout=layout), reward_fn=_reward, algorithm=algorithm,
                      rollout_batch_size=2, n_samples=2, max_new_tokens=6, lr=1e-3, micro_batch_size=2,
                      mini_batch_size=1, num_epochs=2, config=cfg)


def _suite(hf_dir: str, root: str) -> dict:
    out = {}
    for name, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):
        layout = Layout.create(tp, pp)
        for algorithm in ("ppo", "grpo"):
            trainer = _trainer(hf_dir, layout, algorithm)
            out[(name, algorithm)] = [trainer.step(SAMPLES) for _ in range(2)]
            out[(name, algorithm, "roles")] = (trainer.critic_engine is not None, trainer.reference is not None)
    try:  # ranks disagreeing on the number of prompts: a clear error on every rank, not a collective hang
        trainer.step(SAMPLES[: 1 + dist.get_rank()])
        out["mismatch"] = None
    except ValueError as exc:
        out["mismatch"] = str(exc)
    layout = Layout.create(2, 1)
    data = [{**SAMPLES[i % 2], "extra_info": {"i": i}} for i in range(6)]
    run = f"{root}/run"
    first, loader = _trainer(hf_dir, layout, "ppo"), get_dataloader(data, None, 2, seed=3)
    first.fit(loader, steps=1, output_dir=run, save_every=1)  # checkpoint after step 1
    out["uninterrupted"] = first.fit(loader, steps=2, output_dir=run, save_every=0, resume=False)
    out["order_first"] = [s["extra_info"]["i"] for s in first.last_batch.samples]
    second = _trainer(hf_dir, layout, "ppo")
    out["resumed"] = second.fit(get_dataloader(data, None, 2, seed=3), steps=2, output_dir=run, resume=True)
    out["order_second"] = [s["extra_info"]["i"] for s in second.last_batch.samples]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hf_dir = make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=32, num_layers=2)
    root = str(tmp_path_factory.mktemp("ckpt"))
    return run_distributed(_suite, 2, hf_dir, root, timeout_s=600)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_two_steps_finite_and_rank_consistent(results, layout, algorithm):
    steps = results[0][(layout, algorithm)]
    assert len(steps) == 2
    for m in steps:
        for key in KEYS + ("time/generate", "time/reshard", "time/logprob", "time/update"):
            assert math.isfinite(m[key]), (key, m[key])
        assert m["reward/failures"] == 0 and m["reward/timeouts"] == 0
        assert m["rollout/logprob_diff"] < 1e-4  # training forward matches the sampler at this layout
    assert steps[1]["actor/grad_norm"] > 0
    for key in KEYS:  # every rank computed the same step
        assert [s[key] for s in results[1][(layout, algorithm)]] == [s[key] for s in steps], key
    has_critic, has_reference = results[0][(layout, algorithm, "roles")]
    assert has_critic == (algorithm == "ppo") and has_reference
    if algorithm == "ppo":
        assert math.isfinite(steps[1]["critic/loss"]) and steps[1]["critic/grad_norm"] > 0


def test_resume_reproduces_next_step(results):
    r = results[0]
    (expected,), (got,) = r["uninterrupted"], r["resumed"]
    assert r["order_second"] == r["order_first"]  # same next batch (dataloader position restored)
    for key in KEYS + ("critic/loss", "actor/kl_coef", "advantage/mean"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


def test_different_prompt_counts_across_ranks_is_a_clear_error(results):
    assert all("different numbers of prompts [1, 2]" in (r["mismatch"] or "") for r in results)
