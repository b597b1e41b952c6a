"""Memory planner: the estimate of a tiny CPU training run against its measured peak; early, explicit
failure (with the knobs) for a run that cannot fit; `offload.auto`; the 7B shape's arithmetic; keeping the
KV cache between rollouts (`rollout.free_cache` null) only for the gather decode path, where training fits beside it.

How the CPU peak is measured: torch allocates CPU tensor storage through its own allocator
(c10 `alloc_cpu`, posix_memalign), not through Python's allocator, so `tracemalloc` does not see
tensors at all (checked below: a 4 MiB tensor moves its peak by a few hundred bytes). The
profiler's memory events (`profile_memory=True`) are reported by that allocator for every
allocation and free, so their running sum over the run is the live tensor bytes and its maximum the
peak. The run starts inside the profiler (model built there), so the sum is absolute.
"""

import dataclasses
import itertools
import tracemalloc
import types

import pytest
import torch
import torch.profiler as tp

from verl_mega.kernels import fused_logprob_entropy
from verl_mega.models import ModelConfig, build_stage
from verl_mega.parallel import Layout
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer import PPOTrainer, TrainerConfig
from verl_mega.trainer.engine import TrainEngine
from verl_mega.trainer.memory_plan import (DEFAULT_HEADROOM, GIB, MemoryPlanError, Offload, Parallelism, Workload,
                                           auto_offload, plan_memory, stage_params)
from verl_mega.trainer.optim import OptimConfig

MB, SEQ, RESP = 8, 96, 48  # micro-batch sequences, tokens per sequence, response tokens (log-prob rows)
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, max_position_embeddings=256, tie_word_embeddings=False, attention_bias=True,
                   model_type="qwen2")
QWEN25_7B = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                        num_kv_heads=4, head_dim=128, tie_word_embeddings=False, attention_bias=True,
                        model_type="qwen2")


def peak_tensor_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while `fn()` runs (profiler memory events)."""
    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events))


def train_tiny_steps() -> None:
    """Build the tiny fp32 stage and engine, then 2 steps with the trainer's log-prob loss on the responses."""
    layout = Layout.create(1, 1, 1)
    model = build_stage(TINY, layout, init_seed=0)
    engine = TrainEngine(model, layout, OptimConfig(lr=1e-3))
    gen = torch.Generator().manual_seed(0)

    def loss_fn(hidden, mb):
        h = hidden[:, -RESP - 1:-1].reshape(MB * RESP, -1)  # [tokens, hidden]
        lp, _ = fused_logprob_entropy(h, model.output_weight(), mb["input_ids"][:, -RESP:].reshape(-1),
                                      compute_entropy=False)
        return -lp.sum(), {}

    for _ in range(2):  # the second step runs with the Adam moments allocated
        ids = torch.randint(0, TINY.vocab_size, (MB, SEQ), generator=gen)
        mb = {"input_ids": ids, "position_ids": torch.arange(SEQ).expand(MB, SEQ),
              "attention_mask": torch.ones(MB, SEQ, dtype=torch.long), "loss_mask": torch.ones(MB, RESP)}
        engine.forward_backward([mb], loss_fn)
        engine.optimizer_step()


def test_tracemalloc_does_not_see_torch_tensors():
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[1]
    t = torch.ones(2**20)  # 4 MiB
    grew = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert t.sum() == 2**20 and grew < 2**16
    assert peak_tensor_bytes(lambda: torch.ones(2**20)) == 4 * 2**20  # the profiler's events do


def test_estimate_within_25_percent_of_measured_cpu_peak():
    measured = peak_tensor_bytes(train_tiny_steps)
    plan = plan_memory(TINY, Parallelism(), Workload(micro_batch_size=MB, seq_len=SEQ, response_len=RESP,
                                                     rollout_rows=MB), Offload(), param_bytes=4, reference=False)
    update = plan.phases["update"]
    estimate = sum(update.values())
    assert update["activations"] > 0.5 * estimate  # the activation model is what is being tested, not just weights
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured, update)


def test_seven_b_needs_optimizer_offload_on_one_h200():
    params = sum(stage_params(QWEN25_7B, 1, 1, 0))
    assert abs(params - 7.6156e9) < 1e6  # Qwen2.5-7B: 7.62B parameters
    work = Workload(micro_batch_size=4, seq_len=1536, response_len=1024, rollout_rows=128, num_microbatches=32)
    capacity = int(139 * GIB * 0.92)
    plain = plan_memory(QWEN25_7B, Parallelism(), work, Offload(), param_bytes=2, reference=True)
    assert plain.phases["update"]["optimizer"] == params * 12  # fp32 masters + 2 moments on the GPU: the OOM
    assert not plain.fits(capacity)
    choice = auto_offload(QWEN25_7B, Parallelism(), work, param_bytes=2, reference=True, capacity=capacity)
    assert choice.optimizer
    offloaded = plan_memory(QWEN25_7B, Parallelism(), work, choice, param_bytes=2, reference=True)
    assert offloaded.fits(capacity) and offloaded.host["optimizer"] == params * 12


def test_auto_picks_the_fewest_switches():
    work = Workload(micro_batch_size=2, seq_len=64, response_len=32, rollout_rows=4)
    base = dict(param_bytes=4, reference=True)
    plans = {o: plan_memory(TINY, Parallelism(), work, o, **base).peak
             for o in (Offload(), Offload(grads=True), Offload(optimizer=True, grads=True))}
    assert auto_offload(TINY, Parallelism(), work, capacity=plans[Offload()], **base) == Offload()
    assert auto_offload(TINY, Parallelism(), work, capacity=plans[Offload()] - 1, **base) != Offload()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=32, num_layers=2)


def test_impossible_config_fails_before_the_engines_are_built(tiny_dir, capsys):
    cfg = TrainerConfig()
    cfg.offload.memory_gib = 1e-4  # 100 KiB: nothing fits
    cfg.algorithm.kl_coef = 0.1
    with pytest.raises(MemoryPlanError) as info:
        PPOTrainer(tiny_dir, config=cfg, rollout_batch_size=2, n_samples=2, max_new_tokens=8)
    msg = str(info.value)
    assert "does not fit" in msg and "usable device memory" in msg
    for knob in ("offload.optimizer=true", "offload.reference=true", "trainer.micro_batch_size", "parallel.tp"):
        assert knob in msg
    assert "component" in msg and "update" in msg  # the table comes with the error
    assert "memory plan per GPU" not in capsys.readouterr().out  # and only with it (not printed before it too)


def test_offload_switches_reach_the_engines(tiny_dir):
    cfg = TrainerConfig()
    cfg.offload.optimizer = cfg.offload.reference = cfg.offload.grads = True
    cfg.algorithm.kl_coef = 0.1
    trainer = PPOTrainer(tiny_dir, config=cfg, rollout_batch_size=2, n_samples=2, max_new_tokens=4)
    assert trainer.actor_engine.zero.offload and trainer.reference.streamer is not None
    assert "rollout" in trainer.pipeline.names()
    metrics = trainer.step([{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8, 9]}])
    assert metrics["time/rollout"] > 0 and not trainer.actor_engine.training_state_offloaded


def test_offloaded_state_beyond_host_memory_fails_with_host_knobs():
    work = Workload(micro_batch_size=4, seq_len=1536, response_len=1024, rollout_rows=128)
    both = plan_memory(QWEN25_7B, Parallelism(), work, Offload(optimizer=True, reference=True, grads=True),
                       param_bytes=2, reference=True)
    assert 100 * GIB < sum(both.host.values()) < 105 * GIB  # 12 B/param optimizer + staging + reference layers
    host_small = int(100 * GIB)  # e.g. a 112 GiB host's available memory less headroom
    with pytest.raises(MemoryPlanError) as info:
        both.check(int(128 * GIB), host_small)
    assert "host memory" in str(info.value) and "offload.reference=false" in str(info.value)
    choice = auto_offload(QWEN25_7B, Parallelism(), work, param_bytes=2, reference=True, capacity=int(128 * GIB),
                          host_capacity=host_small)
    assert choice == Offload(optimizer=True, grads=True)  # the reference stays on the GPU


def test_ppo_critic_offloads_with_the_actor(tiny_dir):
    cfg = TrainerConfig()
    cfg.offload.optimizer = cfg.offload.grads = True
    trainer = PPOTrainer(tiny_dir, reward_fn=lambda response: float(len(response) % 2), config=cfg, algorithm="ppo",
                         rollout_batch_size=2, n_samples=2, max_new_tokens=4)
    assert trainer.actor_engine.zero.offload and trainer.critic_engine.zero.offload
    metrics = trainer.step([{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8, 9]}])
    assert all(v == v for v in metrics.values())  # finite (no NaN) through rollout hand-over and CPU steps
    assert not trainer.critic_engine.training_state_offloaded


def test_a_kept_kv_cache_is_planned_through_training():
    work = Workload(micro_batch_size=2, seq_len=64, response_len=32, rollout_rows=4)
    freed = plan_memory(TINY, Parallelism(), work, Offload(), param_bytes=4, reference=False)
    kept = plan_memory(TINY, Parallelism(), dataclasses.replace(work, keep_kv_cache=True), Offload(), param_bytes=4,
                       reference=False)
    kv = freed.phases["rollout"]["kv_cache"]
    assert kv > 0 and "kv_cache" not in freed.phases["update"] and not freed.keep_kv_cache
    assert kept.keep_kv_cache and kept.phases["update"]["kv_cache"] == kept.phases["logprob"]["kv_cache"] == kv
    assert kept.peak == freed.peak + kv  # the update phase is the peak of both


def _plan(free_cache, memory_gib, attention="auto", device="cpu"):
    from verl_mega.trainer.memory_plan import plan_for_config

    cfg = TrainerConfig()
    cfg.model.path, cfg.rollout.free_cache, cfg.offload.memory_gib = "/m", free_cache, memory_gib
    cfg.rollout.engine.attention = attention
    return plan_for_config(cfg, TINY, Layout.create(1, 1, 1), device, 4)[1]


def test_free_cache_auto_keeps_the_cache_only_for_gather_graphs_where_training_fits_beside_it():
    freed, kept = _plan(True, 100.0), _plan(False, 100.0)
    assert not freed.keep_kv_cache and kept.keep_kv_cache and kept.peak > freed.peak
    assert _plan(None, 100.0).keep_kv_cache  # plenty of memory: kept (no CUDA-graph recapture per rollout)
    between = (freed.peak + kept.peak) / 2 / GIB / (1 - DEFAULT_HEADROOM)  # memory_gib whose usable bytes lie between
    assert not _plan(None, between).keep_kv_cache  # training needs the cache's memory: freed after each rollout
    assert not _plan(None, None).keep_kv_cache  # no capacity to plan against (CPU): freed, as before
    assert _plan(False, None).keep_kv_cache  # the config's explicit choice stands
    # the paged kernels' graphs survive a freed cache: auto frees it (CUDA's default attention, or paged asked for)
    assert not _plan(None, 100.0, device="cuda").keep_kv_cache and not _plan(None, 100.0, "paged").keep_kv_cache
    assert _plan(None, 100.0, "gather", "cuda").keep_kv_cache and _plan(False, 100.0, "paged").keep_kv_cache


def test_free_cache_auto_frees_where_generation_runs_on_regathered_weights():
    from verl_mega.trainer.memory_plan import plan_for_config

    cfg = TrainerConfig()
    cfg.model.path, cfg.offload.memory_gib, cfg.parallel.tp = "/m", 100.0, 2
    layout = types.SimpleNamespace(tp=2, pp=1, dp=1, rank=0)  # what the plan reads of a Layout (no process group)
    assert plan_for_config(cfg, TINY, layout, "cpu", 4)[1].keep_kv_cache  # tp_g = tp: generation on the training weights
    cfg.parallel.tp_g = 1  # regathered into a new inference model each rollout: its engine is rebuilt anyway
    assert not plan_for_config(cfg, TINY, layout, "cpu", 4)[1].keep_kv_cache


def test_a_kept_cache_serves_the_next_rollout(tiny_dir):
    cfg = TrainerConfig()
    cfg.offload.memory_gib = 100.0
    trainer = PPOTrainer(tiny_dir, config=cfg, rollout_batch_size=2, n_samples=2, max_new_tokens=4)
    assert trainer.free_cache is False and trainer.worker.free_cache is False
    samples = [{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8, 9]}]
    trainer.step(samples)
    engine = trainer.worker._engine
    assert engine is not None and engine.cache.memory_bytes() > 0  # not released after the rollout
    trainer.step(samples)
    assert trainer.worker._engine is engine  # the same engine (and, on CUDA, its captured graphs) again


def test_forward_only_budget_sizes_the_logprob_phase_only():
    """A larger trainer.logprob_max_tokens_per_micro_batch (forward-only passes, nothing kept for backward)
    grows the log-prob phase's activations in proportion and leaves the update phase as it was."""
    work = Workload(micro_batch_size=2, seq_len=64, response_len=32, rollout_rows=4, packed=True,
                    tokens_per_microbatch=128)
    same = plan_memory(TINY, Parallelism(), work, Offload(), param_bytes=4, reference=True)
    larger = plan_memory(TINY, Parallelism(), dataclasses.replace(work, logprob_tokens_per_microbatch=512), Offload(),
                         param_bytes=4, reference=True)
    assert larger.phases["update"] == same.phases["update"]
    assert larger.phases["logprob"]["activations"] == 4 * same.phases["logprob"]["activations"]
