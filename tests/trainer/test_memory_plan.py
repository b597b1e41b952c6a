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


def test_padded_plan_takes_the_rounded_width():
    """With packing off, the plan sizes the padded micro-batches at the width RLBatch.set_rollout makes: prompt +
    max_new_tokens rounded up to trainer.pad_to_multiple_of (the widest batch); packed plans ignore it."""
    from verl_mega.trainer.memory_plan import plan_for_config

    def update_activations(packing: bool, multiple: int) -> float:
        cfg = TrainerConfig()
        cfg.trainer.packing, cfg.trainer.pad_to_multiple_of = packing, multiple
        cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = 30, 33  # width 63 -> 64 at multiple 16
        return plan_for_config(cfg, TINY, Layout.create(1, 1, 1), "cpu", 4)[1].phases["update"]["activations"]

    assert update_activations(False, 16) > update_activations(False, 1)
    assert update_activations(True, 16) == update_activations(True, 1)


def test_partial_full_recompute_and_the_critics_own_mode_are_planned():
    """model.recompute=full on the first K layers (model.recompute_layers) keeps the other layers' activations: K = 0
    plans as no recompute, K >= layers as full, each layer one equal step between; a PPO critic with its own
    model.critic_recompute plans the larger of the two updates; the config's keys reach the plan."""
    from verl_mega.trainer.memory_plan import plan_for_config

    four_layers = dataclasses.replace(TINY, num_layers=4)

    def update_activations(critic: bool = False, **work) -> int:
        w = Workload(micro_batch_size=2, seq_len=64, response_len=32, rollout_rows=4, **work)
        plan = plan_memory(four_layers, Parallelism(), w, Offload(), param_bytes=2, reference=False, critic=critic)
        return plan.phases["update"]["activations"]

    none, full = update_activations(recompute="none"), update_activations(recompute="full")
    partial = [update_activations(recompute="full", recompute_layers=k) for k in range(5)]
    assert partial[0] == none > full == partial[4] == update_activations(recompute="full", recompute_layers=9)
    assert len({partial[k] - partial[k + 1] for k in range(4)}) == 1
    assert update_activations(critic=True, recompute="full", critic_recompute="none") == none
    assert update_activations(critic=True, recompute="none", critic_recompute="full") == none
    assert update_activations(critic=True, recompute="full") == full

    def from_config(**model) -> int:
        cfg = TrainerConfig()
        cfg.algorithm.name = "ppo"
        for key, value in model.items():
            setattr(cfg.model, key, value)
        return plan_for_config(cfg, four_layers, Layout.create(1, 1, 1), "cpu", 4)[1].phases["update"]["activations"]

    assert from_config(recompute="full", recompute_layers=2) > from_config(recompute="full")
    assert from_config(recompute="full", critic_recompute="none") == from_config(recompute="none")


QWEN25_05B = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, tie_word_embeddings=True, attention_bias=True, model_type="qwen2")


def _budget_config(memory_gib=None, train="auto", forward="auto") -> TrainerConfig:
    cfg = TrainerConfig()
    cfg.model.path, cfg.offload.memory_gib = "/m", memory_gib
    cfg.trainer.rollout_batch_size, cfg.rollout.n_samples, cfg.rollout.max_new_tokens = 64, 8, 1024
    cfg.trainer.max_tokens_per_micro_batch, cfg.trainer.logprob_max_tokens_per_micro_batch = train, forward
    return cfg


def _peak_gib(train: int, forward: int | None) -> float:
    """The 0.5B plan's peak in GiB at these budgets (what `auto` compares against the capacity)."""
    from verl_mega.trainer.memory_plan import plan_for_config

    cfg = _budget_config(None, train, forward)
    return plan_for_config(cfg, QWEN25_05B, Layout.create(1, 1, 1), "cpu", 2)[1].peak / GIB


def _memory_gib_for(peak_gib: float) -> float:
    """The offload.memory_gib whose auto share (AUTO_BUDGET_MARGIN of the usable bytes) is exactly `peak_gib`."""
    from verl_mega.trainer.memory_plan import AUTO_BUDGET_MARGIN

    return peak_gib / AUTO_BUDGET_MARGIN / (1 - DEFAULT_HEADROOM)


def test_auto_token_budgets_take_the_largest_that_fits():
    """`auto` picks the largest candidate whose plan fits the auto share of the memory: with the memory between the
    plans at 8192 and 16384 tokens it picks 8192 for training, and the forward-only budget then takes the largest
    size, not below 8192, whose plan fits beside it."""
    from verl_mega.trainer.memory_plan import AUTO_TOKEN_BUDGETS, auto_token_budgets

    layout = Layout.create(1, 1, 1)
    peaks = {size: _peak_gib(size, None) for size in (8192, 16384)}
    assert peaks[8192] < peaks[16384]
    memory = _memory_gib_for((peaks[8192] + peaks[16384]) / 2)
    train, forward = auto_token_budgets(_budget_config(memory), QWEN25_05B, layout, "cpu", 2)
    assert train == 8192
    fitting = [s for s in AUTO_TOKEN_BUDGETS if s >= 8192 and _peak_gib(8192, s) <= (peaks[8192] + peaks[16384]) / 2]
    assert forward == max(fitting) and forward > train  # the forward-only passes keep no activations: larger
    # an explicit value stays as given; a plan that fits nowhere gets the smallest candidate not below a sequence
    assert auto_token_budgets(_budget_config(memory, forward=4096), QWEN25_05B, layout, "cpu", 2) == (8192, 4096)
    assert auto_token_budgets(_budget_config(1e-3), QWEN25_05B, layout, "cpu", 2) == (2048, 2048)  # 128 + 1024 tokens


def test_auto_token_budgets_without_a_capacity_are_the_sequence_counts_in_tokens():
    """CPU without offload.memory_gib: nothing to plan against, so auto = micro_batch_size (logprob_micro_batch_size)
    whole sequences of max_prompt_length + max_new_tokens tokens."""
    from verl_mega.trainer.memory_plan import auto_token_budgets

    cfg = _budget_config()
    cfg.trainer.micro_batch_size, cfg.trainer.logprob_micro_batch_size = 4, 16
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    assert auto_token_budgets(cfg, QWEN25_05B, Layout.create(1, 1, 1), "cpu", 2) == (4 * seq, 16 * seq)


def test_auto_token_budgets_errors_name_the_key():
    from verl_mega.trainer.config import check_config

    cfg = _budget_config()
    cfg.trainer.packing = False
    with pytest.raises(ValueError, match=r"trainer.max_tokens_per_micro_batch=auto needs trainer.packing=true"):
        check_config(cfg)
    cfg = _budget_config(forward="big")
    with pytest.raises(ValueError, match=r"trainer.logprob_max_tokens_per_micro_batch must be a token count, auto"):
        check_config(cfg)


def test_trainer_resolves_auto_budgets_before_it_plans(tiny_dir):
    """The trainer's config holds the resolved token counts (what the stages and the plan read) and a step runs."""
    cfg = TrainerConfig()
    cfg.trainer.max_tokens_per_micro_batch = cfg.trainer.logprob_max_tokens_per_micro_batch = "auto"
    cfg.offload.memory_gib = 1.0
    trainer = PPOTrainer(tiny_dir, reward_fn=lambda r: float(len(r) % 3), config=cfg, rollout_batch_size=2,
                         n_samples=2, max_new_tokens=8, algorithm="grpo")
    t = trainer.config.trainer
    assert t.max_tokens_per_micro_batch == t.logprob_max_tokens_per_micro_batch == 65536  # a tiny model fits them all
    metrics = trainer.step([{"prompt": "1+1="}, {"prompt": "2+3="}])
    assert metrics["batch/oversized_sequences"] == 0 and metrics["actor/grad_norm"] > 0


def _ranks_take_the_smallest_budget(memory_by_rank):
    import torch.distributed as dist

    from verl_mega.parallel.dist import init_distributed
    from verl_mega.trainer.memory_plan import auto_token_budgets

    init_distributed()
    cfg = _budget_config(memory_by_rank[dist.get_rank()])
    return auto_token_budgets(cfg, QWEN25_05B, Layout.create(1, 1, 2), "cpu", 2)


def test_auto_token_budgets_agree_over_ranks():
    """Ranks that see different free memory still cut the same micro-batches: each takes the world's smallest."""
    from verl_mega.testing.multiprocess import run_distributed
    from verl_mega.trainer.memory_plan import auto_token_budgets

    memory = [_memory_gib_for((_peak_gib(8192, None) + _peak_gib(16384, None)) / 2), 100.0]
    dp2 = types.SimpleNamespace(tp=1, pp=1, dp=2, rank=0)  # the ranks' layout, for each one's own pick here
    own = [auto_token_budgets(_budget_config(m), QWEN25_05B, dp2, "cpu", 2) for m in memory]
    assert own[0][0] < own[1][0]  # alone, they would cut different micro-batches
    results = run_distributed(_ranks_take_the_smallest_budget, 2, memory)
    assert results[0] == results[1] == tuple(map(min, zip(*own)))


LAYER_SHAPE = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
                          attention_bias=True, model_type="qwen2")  # q width 128 != hidden 64 != kv width 64


def saved_bytes_per_token(layer, x, cos, sin, mask, skip: set[int]) -> int:
    """Bytes of the distinct storages autograd saves in one forward of `layer` (each counted once; storages in
    `skip` left out), over x's tokens [B, S]. The backward runs too: compiled layers save what they save in training."""
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, cos, sin, mask)
    out.float().sum().backward()
    return sum(saved.values()) // x.shape[:-1].numel()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_activation_model_counts_what_autograd_saves(compiled, recompute):
    """The plan's bytes per token and layer are what autograd keeps for a bf16 layer (padded micro-batch, the mask
    left out: the plan counts it once per micro-batch), less the attention output's reshaped copy, which only CUDA
    runs keep (module docstring)."""
    from verl_mega.models import DecoderModel
    from verl_mega.models.masks import attention_bias, build_attention_mask
    from verl_mega.models.parallelize import apply_compile, apply_recompute
    from verl_mega.trainer.memory_plan import activation_bytes_per_token_layer

    torch._dynamo.reset()
    cfg, seq = LAYER_SHAPE, 24
    model = DecoderModel(cfg, Layout.create(1, 1).tp_group, layer_range=(0, 1), has_embedding=True, has_head=True,
                         init_seed=0).to(torch.bfloat16)
    apply_recompute(model, recompute)
    apply_compile(model, compiled)
    attention_mask = torch.ones(2, seq, dtype=torch.long)
    attention_mask[1, :5] = 0  # a left-padded row
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    mask = attention_bias(build_attention_mask(attention_mask, None, seq, False), torch.bfloat16)
    cos, sin = model.rotary(positions, torch.bfloat16)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin, mask]}
    x = torch.randn(2, seq, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # the first call compiles
        measured = saved_bytes_per_token(model.layers[0], x, cos, sin, mask, skip)
    reshaped_copy = 2 * cfg.num_heads * cfg.head_dim
    try:
        assert measured == activation_bytes_per_token_layer(cfg, 1, 2, recompute, compiled) - reshaped_copy
    finally:
        torch._dynamo.reset()
