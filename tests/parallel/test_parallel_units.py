"""Single-process units of the training engine's parallel parts: ZeRO partition, LR schedule,
fp32 grad buffers and buckets, vocab-parallel log-probs at tp=1, which ranks count for the grad norm."""

import gc
import math
import weakref

import pytest
import torch
from torch import nn

from verl_mega.parallel import Layout
from verl_mega.parallel.data_parallel import DataParallelGrads
from verl_mega.parallel.grad_clip import counts_for_norm, global_grad_norm
from verl_mega.parallel.zero import partition_params
from verl_mega.trainer.optim import OptimConfig, lr_factor


def test_partition_is_contiguous_and_balanced():
    numels = [100, 5, 5, 300, 50, 50, 200, 10, 80]
    for dp in (1, 2, 3, 4):
        owners = partition_params(numels, dp)
        assert owners == sorted(owners) and owners[0] == 0 and owners[-1] <= dp - 1
        loads = [sum(n for n, o in zip(numels, owners) if o == r) for r in range(dp)]
        assert max(loads) <= sum(numels) / dp + max(numels)


def test_lr_schedule_and_config_errors():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", total_steps=14, min_lr=0.1)
    assert [lr_factor(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cfg, 14) == pytest.approx(0.1) and lr_factor(cfg, 100) == pytest.approx(0.1)
    assert lr_factor(OptimConfig(lr=1.0), 7) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        OptimConfig(schedule="cosine", warmup_steps=5, total_steps=5)


def test_grad_buffers_accumulate_in_fp32_and_buckets_cover_the_buffer():
    layout = Layout.create(1, 1, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).bfloat16()
    ref = [torch.zeros(p.shape) for p in model.parameters()]
    grads = DataParallelGrads(list(model.parameters()), layout.dp_group, bucket_mb=0.0002)  # ~52 floats: 3 buckets
    for i in range(2):
        x = torch.randn(3, 16).bfloat16()
        if i == 1:
            grads.before_last_backward()
        model(x).float().square().sum().backward()
        for r, p in zip(ref, model.parameters()):
            assert p.grad is None  # moved into main_grad by the hook
        gs = torch.autograd.grad(model(x).float().square().sum(), list(model.parameters()))
        for r, g in zip(ref, gs):
            r += g.float()
    grads.finish()
    for r, p in zip(ref, model.parameters()):
        assert p.main_grad.dtype == torch.float32 and torch.allclose(p.main_grad, r, rtol=1e-2, atol=1e-2)
    sizes = [b.flat.numel() for b in grads.buckets]
    assert len(sizes) > 1 and sum(sizes) == grads.buffer.numel()
    grads.zero()
    assert grads.buffer.abs().sum() == 0


def test_a_second_grad_buffer_over_the_same_params_takes_them_over():
    """Two DataParallelGrads over one model (a re-built trainer): the gradients go to the newest, exactly once."""
    layout = Layout.create(1, 1, 1)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    first = DataParallelGrads(list(model.parameters()), layout.dp_group)
    second = DataParallelGrads(list(model.parameters()), layout.dp_group)
    ref = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    model(x).square().sum().backward()
    second.finish()
    for r, p in zip(ref, model.parameters()):
        assert p.grad is None and torch.equal(p.main_grad, r)  # one add of the same fp32 grad: exact
    assert first.buffer.abs().sum() == 0


def test_deleted_model_and_grad_buffer_are_freed():
    """The hook does not keep its DataParallelGrads alive: a deleted model (a re-built trainer, the next run of a
    benchmark process) frees its parameters and its fp32 gradient buffer."""
    layout = Layout.create(1, 1, 1)
    model = nn.Linear(4, 3)
    grads = DataParallelGrads(list(model.parameters()), layout.dp_group)
    model(torch.randn(2, 4)).sum().backward()
    assert model.weight.grad is None and grads.buffer.abs().sum() > 0  # the hook ran
    param, buffer = weakref.ref(model.weight), weakref.ref(grads.buffer)
    del model, grads
    gc.collect()
    assert param() is None and buffer() is None


def test_single_tensor_all_gather_does_not_warn():
    """ZeRO's parameter all-gather uses torch 2.13's name (the deprecated one printed a FutureWarning per rank)."""
    import warnings

    from verl_mega.parallel.dist import all_gather_single

    layout = Layout.create(1, 1, 1)
    out = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        all_gather_single(out, torch.arange(3.0), group=layout.dp_group)
    assert out.tolist() == [0.0, 1.0, 2.0]


def test_vocab_parallel_log_probs_tp1_masks_padding():
    from verl_mega.parallel.vocab_parallel import vocab_parallel_log_probs
    layout = Layout.create(1, 1, 1)
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(16, 8)
    weight[12:] = 0  # padded rows: would add exp(0) terms if not masked
    labels = torch.randint(0, 12, (2, 5))
    got = vocab_parallel_log_probs(hidden, weight, labels, tp_group=layout.tp_group, vocab_start=0,
                                   true_vocab_size=12, temperature=0.7)
    want = torch.log_softmax((hidden @ weight[:12].t()) / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)


def test_grad_norm_counting_rules():
    sharded, replicated, tied = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    sharded.tensor_model_parallel = True
    tied.tensor_model_parallel, tied.shared_embedding = True, True
    assert counts_for_norm(sharded, tp_rank=1, is_first_stage=False)
    assert not counts_for_norm(replicated, tp_rank=1, is_first_stage=True)
    assert counts_for_norm(replicated, tp_rank=0, is_first_stage=False)
    assert counts_for_norm(tied, tp_rank=1, is_first_stage=True)
    assert not counts_for_norm(tied, tp_rank=0, is_first_stage=False)
    layout = Layout.create(1, 1, 1)
    norm = global_grad_norm([torch.full((3,), 2.0), torch.full((1,), 2.0)], [layout.mp_group, layout.dp_group])
    assert norm.item() == pytest.approx(4.0)
