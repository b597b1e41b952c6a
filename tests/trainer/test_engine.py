"""TrainEngine in one process: equals a plain transformers + torch.optim loop; bf16 mixed precision;
API errors; non-finite steps are skipped.

Reference loop: HF LlamaForCausalLM, full-batch token-mean cross entropy, torch AdamW (decay on
matrices), LambdaLR with the same factor, clip_grad_norm_. Tolerances (fp32; our decoder vs transformers
differ only in rounding): gradients per step GRAD_RTOL of max |g|, loss / grad norm / lr HIST_RTOL
relative, weights within the per-element AdamW bound (`_engine_cases.adamw_weight_bound`)."""

import pytest
import torch

from _engine_cases import (HIST_RTOL, adamw_weight_bound, assert_grads_close, assert_weights_within, build_engine,
                           full_weights, global_batch, local_microbatches, make_hf_dir, optim_config, train)
from verl_mega.parallel import Layout
from verl_mega.trainer.engine import causal_lm_microbatches, next_token_loss
from verl_mega.trainer.optim import lr_factor


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("hf") / "llama"))


def _hf_reference(hf_dir, steps):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = optim_config()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    hist, grads = [], []
    for step in range(steps):
        (mb,) = causal_lm_microbatches(*global_batch(step), num_microbatches=1)
        logits = model(mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"]).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, mb["labels"][..., None]).squeeze(-1)
        loss = -(logp * mb["loss_mask"]).sum() / mb["loss_mask"].sum()
        loss.backward()
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})  # before clipping
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        hist.append((loss.item(), norm.item(), opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
        opt.zero_grad()
    return hist, {k: v.detach() for k, v in model.state_dict().items()}, grads


def test_engine_matches_transformers_plus_torch_optim(hf_dir):
    layout = Layout.create(1, 1, 1)
    engine, trace = build_engine(layout, hf_dir), []
    hist = train(engine, range(3), layout, trace)  # 4 micro-batches of 2 per step
    ref_hist, ref_weights, ref_grads = _hf_reference(hf_dir, 3)
    for got, want in zip(hist, ref_hist):
        assert all(abs(g - w) <= HIST_RTOL * max(1.0, abs(w)) for g, w in zip(got, want)), (hist, ref_hist)
    assert_grads_close(ref_grads, [step["grads"] for step in trace])
    ours = full_weights(engine, layout)
    assert set(ours) == set(ref_weights)
    bound = adamw_weight_bound(trace, hist, ref_grads, ref_hist, ours, optim_config())
    assert_weights_within(ref_weights, ours, bound, hist)
    assert hist[0][2] == pytest.approx(1e-3 / 2) and hist[0][1] > 1.0  # warm-up lr; the norm was clipped


def test_bf16_params_with_fp32_masters(hf_dir):
    layout = Layout.create(1, 1, 1)
    ref = build_engine(layout, hf_dir)
    fp32 = train(ref, range(3), layout)
    engine = build_engine(layout, hf_dir, param_dtype=torch.bfloat16)
    bf16 = train(engine, range(3), layout)
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    assert all(m.dtype == torch.float32 for m in engine.zero.masters)
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(engine.zero.owned, engine.zero.masters))
    for (l32, n32, _), (l16, n16, _) in zip(fp32, bf16):
        assert abs(l32 - l16) < 0.05 * l32 and abs(n32 - n16) < 0.1 * n32
    for m, w in zip(engine.zero.masters, ref.zero.masters):  # fp32 masters track the fp32 run closely
        assert (m - w).abs().max().item() < 2e-2


def test_grad_accumulation_over_calls_and_api_errors(hf_dir):
    layout = Layout.create(1, 1, 1)
    one = build_engine(layout, hf_dir)
    mbs = local_microbatches(layout, 0)
    whole = one.forward_backward(mbs, next_token_loss(one))
    with pytest.raises(ValueError, match="already synchronised"):
        one.forward_backward(mbs, next_token_loss(one))
    split = build_engine(layout, hf_dir)
    total = sum(mb["loss_mask"].sum().item() for mb in mbs)
    m1 = split.forward_backward(mbs[:1], next_token_loss(split), loss_normalizer=total, sync_grads=False)
    m2 = split.forward_backward(mbs[1:], next_token_loss(split), loss_normalizer=total)
    assert torch.allclose(split.grads.buffer, one.grads.buffer, atol=1e-7)
    assert abs(one.optimizer_step()["grad_norm"] - split.optimizer_step()["grad_norm"]) < 1e-6
    assert m1["loss"] + m2["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="'loss_mask'"):
        split.forward_backward([{k: v for k, v in mbs[0].items() if k != "loss_mask"}], next_token_loss(split))


def test_non_finite_grad_norm_skips_the_update(hf_dir):
    layout = Layout.create(1, 1, 1)
    engine = build_engine(layout, hf_dir)
    before = [p.detach().clone() for p in engine.model.parameters()]
    engine.forward_backward(local_microbatches(layout, 0), lambda out, mb: (out.sum() * float("nan"), {}))
    stats = engine.optimizer_step()
    assert stats["grad_norm"] != stats["grad_norm"] and engine.skipped_steps == 1 and engine.adam_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
