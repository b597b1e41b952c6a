"""Streaming rewards: the Rollout stage hands each response to the RewardRunner as it finishes, so reward
calls start while other rows are still generating; the Reward stage then only collects (same scores,
failures counted as by `compute_rewards`)."""

import threading
import time

from verl_mega.rewards.base import compute_rewards
from verl_mega.rollout import get_actor_model
from verl_mega.rollout.engine_config import EngineConfig
from verl_mega.trainer.batch import RLBatch
from verl_mega.trainer.config import RolloutSection
from verl_mega.trainer.reward_runner import RewardRunner
from verl_mega.trainer.stages import Reward, Rollout


def test_rewards_start_before_generation_ends_and_collect_the_same_scores(hf_dir):
    actor = get_actor_model(hf_dir)
    worker = actor.rollout_worker(engine_config=EngineConfig(max_batch=2, max_seq_len=64, block_size=4))
    events, lock = [], threading.Lock()

    def reward(response: str) -> float:
        with lock:
            events.append(("call", time.perf_counter()))
        if response.count("a") % 4 == 3:
            raise RuntimeError("reward bug")
        return float(len(response))

    runner = RewardRunner(reward, actor.layout, timeout_s=10.0, max_workers=4)
    submit = runner.submit

    def recording_submit(row, ids):
        with lock:
            events.append(("finish", time.perf_counter()))
        submit(row, ids)

    runner.submit = recording_submit
    config = RolloutSection(n_samples=2, max_new_tokens=16, temperature=1.0)
    rollout = Rollout(worker, config, seed=0, tokenizer=actor.tokenizer, pad_id=0, rewards=runner)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    batch = rollout(RLBatch(samples=[{} for _ in prompts], prompt_ids=prompts, n=2))
    batch = Reward(runner)(batch)
    runner.close()
    finishes = sorted(t for kind, t in events if kind == "finish")
    calls = sorted(t for kind, t in events if kind == "call")
    assert len(finishes) == len(calls) == 8  # every row streamed once, none scored twice
    assert calls[0] < finishes[-1]  # scoring began while rows were still generating
    ref = compute_rewards(reward, batch.response_texts)
    assert batch.scores.tolist() == ref.scores.tolist()
    assert batch.reward_failures == ref.failures
