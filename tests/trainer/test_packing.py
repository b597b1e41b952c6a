"""Packed micro-batches (trainer/packing.py + the decoder's varlen attention) give the padded numbers.

- pack_microbatch on a hand-made case (positions restart, cu_seqlens, response_index);
- the decoder's hidden states, packed vs padded (fp32, 1e-5: same arithmetic per token, only the
  attention's reduction length differs — padded keys are masked to exactly 0 weight);
- the RL response log-probs / values, packed vs padded, and an RLBatch token budget;
- loss and gradients of one forward_backward at (tp, pp, dp) = (1,1,1) in process and (2,1,1), (1,2,1),
  (1,1,2) on 2 gloo ranks, packed vs the single-process padded run (1e-5: fp32, reduction order only).
- token-budget grouping and the dp partition bounds; at dp = 2 the re-dealt, packed, budgeted
  micro-batches: within budget, ranks' token counts within one sequence, per-row results back to their
  owners, and an RL loss + grads equal to one process running both ranks' rows padded.
"""

import pytest
import torch
import torch.distributed as dist

from _engine_cases import build_engine, local_microbatches, make_hf_dir, merge
from verl_mega.models.config import ModelConfig
from verl_mega.models.parallelize import build_stage
from verl_mega.parallel import Layout
from verl_mega.testing import run_distributed
from verl_mega.trainer.batch import RLBatch
from verl_mega.trainer.engine import next_token_loss
from verl_mega.trainer.packing import balanced_partition, gather_to_owners, pack_microbatch, token_budget_groups
from verl_mega.trainer.stages import response_logprobs, response_values, rows_in_order

TOL = 1e-5
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]


def test_pack_microbatch_hand_case():
    mb = {"input_ids": torch.tensor([[0, 5, 6, 7, 0], [8, 9, 1, 2, 3]]),
          "attention_mask": torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
          "responses": torch.tensor([[7, 0], [2, 3]]), "response_mask": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    mb["input_ids"][0, 3] = 7  # row 0: prompt [5, 6], response [7]; row 1: prompt [8, 9, 1], response [2, 3]
    p = pack_microbatch(mb)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert p["cu_seqlens"].tolist() == [0, 3, 8] and p["cu_seqlens"].dtype == torch.int32
    assert p["response_index"].tolist() == [1, 5, 6]  # positions predicting tokens 7, 2, 3
    assert p["response_slot"].tolist() == [0, 2, 3]  # the same tokens' places in the flattened [2, 2] responses
    assert "attention_mask" not in p and p["responses"] is mb["responses"]


def test_packed_boundaries_stay_on_the_host():
    # The model reads the sequence lengths on the host: micro-batches moved to a device keep cu_seqlens behind
    # (no device round trip per forward), and PackedSeqs puts the offsets where the model runs.
    from verl_mega.models.varlen_attention import PackedSeqs
    (mb,) = _rl_batch().microbatches(6, device=torch.device("meta"), packed=True)
    assert mb["input_ids"].device.type == "meta" and mb["response_slot"].device.type == "meta"
    assert mb["cu_seqlens"].device.type == "cpu"
    seqs = PackedSeqs.from_cu_seqlens(mb["cu_seqlens"], "meta")
    assert seqs.cu_seqlens.device.type == "meta" and seqs.cu_seqlens.dtype == torch.int32
    assert list(seqs.lengths) == mb["cu_seqlens"].diff().tolist() and seqs.max_seqlen == max(seqs.lengths)


def _rl_batch(seed=0, rows=6, prompt=5, resp=7, vocab=120, width_multiple=1) -> RLBatch:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(1, prompt + 1, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(rows // 2)]
    batch = RLBatch(samples=[{}] * len(prompts), prompt_ids=prompts, n=2)
    responses = [torch.randint(3, vocab, (int(torch.randint(0, resp + 1, (1,), generator=gen)),),
                               generator=gen).tolist() for _ in range(rows)]
    batch.set_rollout(responses, [[0.0] * len(r) for r in responses], pad_id=0, width_multiple=width_multiple)
    return batch


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("packing") / "hf"))


def test_decoder_packed_equals_padded(hf_dir):
    layout = Layout.create(1, 1, 1)
    model = build_stage(ModelConfig.from_hf(hf_dir), layout, init_seed=1)
    batch = _rl_batch()
    (padded,) = batch.microbatches(6)
    (packed,) = batch.microbatches(6, packed=True)
    want = model(padded["input_ids"], padded["position_ids"], padded["attention_mask"], return_hidden=True)
    got = model(packed["input_ids"], packed["position_ids"], cu_seqlens=packed["cu_seqlens"], return_hidden=True)
    assert got.shape == (1, int(batch.attention_mask.sum()), 32)
    assert torch.allclose(got[0], want[batch.attention_mask.bool()], atol=TOL, rtol=0)
    lp_pad = response_logprobs(want, padded, model, layout.tp_group, 1.0, True)
    lp_pack = response_logprobs(got, packed, model, layout.tp_group, 1.0, True)
    mask = batch.response_mask
    for a, b in zip(lp_pad, lp_pack):
        assert torch.allclose(a * mask, b, atol=TOL, rtol=0) and (b[mask == 0] == 0).all()
    v_pad, v_pack = want[..., 0], got[..., 0]  # stand-ins shaped like a value model's output: [b, S] / [1, T]
    assert torch.allclose(response_values(v_pad, padded) * mask, response_values(v_pack, packed), atol=TOL, rtol=0)


def test_padded_width_multiple_adds_only_padding(hf_dir):
    # trainer.pad_to_multiple_of widens the batch (P + R a multiple of it) with padding columns: the valid
    # tokens' response log-probs are those of the plain batch (fp32, 1e-5: only masked keys are added).
    model = build_stage(ModelConfig.from_hf(hf_dir), Layout.create(1, 1, 1), init_seed=1)
    plain, wide = _rl_batch(), _rl_batch(width_multiple=16)
    assert wide.input_ids.shape[1] % 16 == 0 and plain.input_ids.shape[1] % 16 != 0
    r = plain.responses.shape[1]
    assert torch.equal(wide.response_mask[:, :r], plain.response_mask) and wide.response_mask[:, r:].sum() == 0
    assert torch.equal(wide.responses[:, :r], plain.responses)
    out = []
    for batch in (plain, wide):
        (mb,) = batch.microbatches(6)
        hidden = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], return_hidden=True)
        out.append(response_logprobs(hidden, mb, model, None, 1.0, False)[0])
    assert torch.allclose(out[1][:, :r] * plain.response_mask, out[0] * plain.response_mask, atol=TOL, rtol=0)


@pytest.mark.parametrize("packing", [True, False])
def test_logprob_stage_checks_token_ids_on_the_host(hf_dir, packing):
    # The stages check every id against the vocabulary once, on the host, naming the batch row; their log-prob
    # calls then skip the kernel's own check (on CUDA a wait for each micro-batch's forward). A valid batch goes
    # through, and the host check is what rejects a bad one, padded or packed.
    from verl_mega.trainer.config import TrainerConfig
    from verl_mega.trainer.stages import LogProbs
    layout = Layout.create(1, 1, 1)
    engine = build_engine(layout, hf_dir)
    t = TrainerConfig().trainer
    t.packing = packing
    stage = LogProbs(engine, None, None, layout, temperature=1.0, trainer_cfg=t, device=torch.device("cpu"))
    vocab = engine.model.true_vocab_size
    good = _rl_batch(vocab=vocab)
    assert stage(good).old_logprobs.shape == good.responses.shape
    bad = _rl_batch(vocab=vocab)
    col = bad.input_ids.shape[1] - bad.responses.shape[1]  # row 3's first response token
    bad.input_ids[3, col] = bad.responses[3, 0] = vocab
    with pytest.raises(ValueError, match=rf"batch row 3 holds token ids outside the model's vocabulary \[0, {vocab}\)"):
        stage(bad)


def test_token_budget_microbatches_keep_row_order():
    batch = _rl_batch(seed=3, rows=10)
    lengths = batch.attention_mask.sum(-1)
    budget = int(lengths.max()) + 2
    mbs = batch.microbatches(4, packed=True, max_tokens=budget)
    assert all(int(mb["cu_seqlens"][-1]) <= budget for mb in mbs)
    assert sorted(torch.cat([mb["rows"] for mb in mbs]).tolist()) == list(range(10))
    outs = [{"len": lengths[mb["rows"]]} for mb in mbs]
    assert torch.equal(rows_in_order(outs, mbs, "len"), lengths)
    with pytest.warns(UserWarning, match="longer than"):
        small = batch.microbatches(4, max_tokens=int(lengths.max()) - 1)
    assert batch.metrics["batch/oversized_sequences"] == int((lengths == lengths.max()).sum())
    assert sum(len(mb["rows"]) for mb in small) == 10


def test_forward_only_passes_take_their_own_micro_batch_sizes():
    """trainer.logprob_micro_batch_size / logprob_max_tokens_per_micro_batch size the forward-only passes
    (old and reference log-probs, critic values); unset, those passes use the training sizes."""
    from verl_mega.trainer.config import TrainerConfig, check_config, micro_batch_sizes
    from verl_mega.trainer.stages import training_microbatches

    cfg = TrainerConfig()
    t = cfg.trainer
    t.micro_batch_size, t.max_tokens_per_micro_batch = 2, 40
    assert micro_batch_sizes(t, forward_only=True) == micro_batch_sizes(t) == (2, 40)
    t.logprob_micro_batch_size, t.logprob_max_tokens_per_micro_batch = 6, 120
    assert micro_batch_sizes(t) == (2, 40) and micro_batch_sizes(t, forward_only=True) == (6, 120)
    batch = _rl_batch(seed=3, rows=10)
    layout = Layout.create(1, 1, 1)
    train = training_microbatches(batch, t, layout, None)
    forward = training_microbatches(batch, t, layout, None, forward_only=True)
    assert all(int(mb["cu_seqlens"][-1]) <= 40 for mb in train if len(mb["rows"]) > 1)
    assert all(int(mb["cu_seqlens"][-1]) <= 120 for mb in forward) and len(forward) < len(train)
    t.packing, t.max_tokens_per_micro_batch, t.logprob_max_tokens_per_micro_batch = False, None, None  # row counts
    assert [len(mb["rows"]) for mb in training_microbatches(batch, t, layout, None)] == [2] * 5
    assert [len(mb["rows"]) for mb in training_microbatches(batch, t, layout, None, forward_only=True)] == [6, 4]
    t.logprob_max_tokens_per_micro_batch = 0
    with pytest.raises(ValueError, match="trainer.logprob_max_tokens_per_micro_batch must be >= 1"):
        check_config(cfg)


def test_token_budget_groups_and_partition():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 1024, (200,), generator=gen).tolist() + [3000]
    groups, oversized = token_budget_groups(lengths, 2048)
    assert oversized == 1 and sorted(i for g in groups for i in g) == list(range(201))
    assert all(sum(lengths[i] for i in g) <= 2048 for g in groups if len(g) > 1)
    # first-fit decreasing: no two non-oversized groups could be merged
    loads = sorted(sum(lengths[i] for i in g) for g in groups if lengths[g[0]] <= 2048)
    assert loads[0] + loads[1] > 2048
    for parts in (2, 3, 8):
        split = balanced_partition(lengths, parts)
        sums = [sum(lengths[i] for i in p) for p in split]
        assert sorted(i for p in split for i in p) == list(range(201))
        assert max(sums) - min(sums) <= max(lengths)  # within one sequence
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        token_budget_groups(lengths, 0)


def _grads(engine, layout) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) gradients of this stage by HF name, on tp rank 0 of dp replica 0."""
    model, out = engine.model, {}
    for name, p in model.named_parameters():
        g = p.main_grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and layout.tp > 1:
            parts = [torch.empty_like(g) for _ in range(layout.tp)]
            dist.all_gather(parts, g.contiguous(), group=layout.tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[model.hf_name(name)] = g[:model.true_vocab_size] if model.is_vocab_param(name) else g
    return out if layout.tp_rank == 0 and layout.dp_rank == 0 else {}


def _loss_and_grads(layout, hf_dir, packed: bool):
    engine = build_engine(layout, hf_dir)
    mbs = local_microbatches(layout, 0)
    if packed:
        mbs = [pack_microbatch(mb) for mb in mbs]
    loss = engine.forward_backward(mbs, next_token_loss(engine))["loss"]
    return loss, _grads(engine, layout)


BUDGET = 16  # tokens per micro-batch: the test batches' rows are 2..12 tokens long


def _rl_loss(engine, layout):
    """loss_fn: -(sum of response log-probs) (the RL stages' response_logprobs on padded or packed mbs)."""
    def loss_fn(hidden, mb):
        lp, _ = response_logprobs(hidden, mb, engine.model, layout.tp_group, 1.0, False)
        return -(lp * mb["response_mask"].to(lp.device)).sum(), {}
    return loss_fn


def _balanced(hf_dir):
    """dp=2, each rank its own RLBatch; rows re-dealt over dp, packed, token budget: micro-batch sizes, the
    ranks' token counts, a per-row round trip and the loss / grads of an RL loss."""
    layout = Layout.create(1, 1, 2)
    batch = _rl_batch(seed=10 + layout.dp_rank, rows=8)
    mbs = batch.microbatches(4, packed=True, max_tokens=BUDGET, dp_group=layout.dp_group)
    lengths = [int(mb["cu_seqlens"][-1]) for mb in mbs]
    back = gather_to_owners(torch.cat([mb["response_mask"] for mb in mbs]), torch.cat([mb["rows"] for mb in mbs]),
                            layout.dp_group)[:, :batch.responses.shape[1]]
    engine = build_engine(layout, hf_dir)
    loss = engine.forward_backward(mbs, _rl_loss(engine, layout), loss_mask_key="response_mask")["loss"]
    return {"mb_tokens": lengths, "round_trip": torch.equal(back, batch.response_mask), "loss": loss,
            "grads": _grads(engine, layout), "own_lengths": batch.attention_mask.sum(-1).tolist()}


def _suite(hf_dir):
    out = {sizes: _loss_and_grads(Layout.create(*sizes), hf_dir, packed=True) for sizes in LAYOUTS}
    out["balanced"] = _balanced(hf_dir)
    return out


@pytest.fixture(scope="module")
def reference(hf_dir):
    return _loss_and_grads(Layout.create(1, 1, 1), hf_dir, packed=False)


def _assert_close(loss, grads, ref):
    assert abs(loss - ref[0]) < TOL * max(1.0, abs(ref[0])), (loss, ref[0])
    for k, g in grads.items():
        assert torch.allclose(g, ref[1][k], atol=TOL, rtol=0), (k, (g - ref[1][k]).abs().max())


def test_packed_loss_and_grads_single_process(hf_dir, reference):
    loss, grads = _loss_and_grads(Layout.create(1, 1, 1), hf_dir, packed=True)
    assert grads.keys() == reference[1].keys()
    _assert_close(loss, grads, reference)


def test_packed_layouts_and_dp_balanced_budget(hf_dir, reference):
    ranks = run_distributed(_suite, 2, hf_dir, timeout_s=300)
    for sizes in LAYOUTS:  # packed at every layout = the single-process padded loss and gradients
        merged = {}
        for r in ranks:
            merged.update(r[sizes][1])
            _assert_close(r[sizes][0], {}, reference)  # every rank reports the global loss
        assert merged.keys() == reference[1].keys(), sizes
        _assert_close(ranks[0][sizes][0], merged, reference)
    runs = [r["balanced"] for r in ranks]
    all_lengths = runs[0]["own_lengths"] + runs[1]["own_lengths"]
    for r in runs:
        assert r["round_trip"] and all(n <= BUDGET for n in r["mb_tokens"])
    totals = [sum(r["mb_tokens"]) for r in runs]
    assert sum(totals) == sum(all_lengths) and abs(totals[0] - totals[1]) <= max(all_lengths), totals
    # the RL loss over both ranks' rows, re-dealt and packed = one process, padded, both batches
    engine = build_engine(Layout.create(1, 1, 1), hf_dir)
    batches = [_rl_batch(seed=10 + i, rows=8) for i in range(2)]
    count = float(sum(b.response_mask.sum() for b in batches))
    loss = sum(engine.forward_backward(b.microbatches(8), _rl_loss(engine, Layout.create(1, 1, 1)),
                                       loss_normalizer=count, sync_grads=False)["loss"] for b in batches)
    _assert_close(runs[0]["loss"], merge([r["grads"] for r in runs]), (loss, _grads(engine, Layout.create(1, 1, 1))))


def _ppo_step(hf_dir, layout, **trainer_cfg):
    """One PPO step (critic, reference, 2 mini-batches) under the given trainer/parallel settings."""
    from verl_mega.rollout import get_actor_model
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    cfg = TrainerConfig()
    cfg.algorithm.kl_coef, cfg.algorithm.kl_in_reward = 0.02, True
    cfg.trainer.progress_bar, cfg.trainer.save_final = False, False
    for key, value in trainer_cfg.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    torch.manual_seed(0)
    trainer = PPOTrainer(get_actor_model(hf_dir, layout=layout), reward_fn=lambda r: float(len(r) % 3), algorithm="ppo",
                         rollout_batch_size=2, n_samples=3, max_new_tokens=6, lr=1e-3, micro_batch_size=2,
                         mini_batch_size=1, config=cfg)
    prompts = [{"prompt": "Count: 1 2 3", "ground_truth": "4"}, {"prompt": "hi", "ground_truth": "1"}]
    return trainer.step(prompts)


def _trainer_suite(hf_dir):
    padded = {"trainer.packing": False}
    budget = {"trainer.packing": True, "trainer.max_tokens_per_micro_batch": 24}
    out = {}
    for sizes, variants in (((2, 1, 1), {"padded": padded, "sp": {**budget, "parallel.sequence_parallel": True}}),
                            ((1, 1, 2), {"padded": padded, "balanced": budget,
                                         "forward_budget": {**budget, "trainer.logprob_max_tokens_per_micro_batch": 64,
                                                            "trainer.old_logprobs": "recompute"}}),
                            ((1, 2, 1), {"padded": padded, "budget": budget})):
        for name, settings in variants.items():
            out[(sizes, name)] = _ppo_step(hf_dir, Layout.create(*sizes), **settings)
    return out


def test_trainer_step_packed_budget_sp_equals_padded(tmp_path):
    """PPO steps (actor, critic, reference) at tp=2 with sequence parallel, dp=2 with rows re-dealt over dp
    (also with the forward-only passes at their own, larger token budget), pp=2 with a token budget: the same
    losses as padded micro-batches (1e-5 relative: fp32, reduction order)."""
    from verl_mega.testing.tiny_hf import make_tiny_hf_model

    hf = make_tiny_hf_model(str(tmp_path / "tiny"), hidden_size=32, num_layers=2)
    ranks = run_distributed(_trainer_suite, 2, hf, timeout_s=400)
    keys = ("actor/loss", "actor/grad_norm", "critic/loss", "critic/grad_norm", "actor/kl_ref", "rollout/logprob_diff")
    for r in ranks:
        for sizes, other in (((2, 1, 1), "sp"), ((1, 1, 2), "balanced"), ((1, 1, 2), "forward_budget"),
                             ((1, 2, 1), "budget")):
            want, got = r[(sizes, "padded")], r[(sizes, other)]
            for key in keys:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (sizes, other, key)
