"""TrainEngine on 2 gloo ranks: (tp, pp, dp) in {(2,1,1), (1,2,1), (1,1,2)} (+ tied embeddings at pp=2)
reproduce the single-process run (3 AdamW steps, 4 micro-batches, left padding); checkpoints saved
at one layout resume at another. One spawn runs everything; tests assert on its results.

What must match is what the layout computes: the gradients of every step (GRAD_RTOL of max |g|),
losses / grad norms / lr (HIST_RTOL relative) and forward-only log-probs (LOGP_ATOL). The weights are
then held to the per-element bound that AdamW's update allows given those gradients
(`_engine_cases.adamw_weight_bound`: the derivation is there)."""

import pytest
import torch

from _engine_cases import (HIST_RTOL, adamw_weight_bound, assert_grads_close, assert_weights_within, build_engine,
                           full_weights, history_diff, log_probs, make_hf_dir, merge, optim_config, train)
from verl_mega.parallel import Layout
from verl_mega.testing import run_distributed
from verl_mega.trainer.checkpoint import load_checkpoint, save_checkpoint

LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
# Forward-only log-probs of the *initial* (identical) weights: only the fp32 summation order differs,
# through 2 layers of sums of <= 64 terms and a 120-way logsumexp: ~10 reordered sums in series, each
# ~sqrt(64) * 6e-8 = 5e-7 relative, on values |logp| <= ~6, gives ~3e-5 worst; measured <= 1e-6.
LOGP_ATOL = 3e-5


def _grads(trace: list[dict]) -> list[dict]:
    return [step["grads"] for step in trace]


def _suite(hf_dir: str, hf_tied: str, ckpt_root: str) -> dict:
    out = {}
    for tp, pp, dp in LAYOUTS:  # parity; (2,1,1) also saves after step 2
        layout = Layout.create(tp, pp, dp)
        engine = build_engine(layout, hf_dir)
        logp, trace = log_probs(engine, layout, 0), []
        hist = train(engine, [0, 1], layout, trace)
        if (tp, pp, dp) == (2, 1, 1):
            save_checkpoint(engine, f"{ckpt_root}/plain", 2, data_state={"next_step": 2}, tokenizer_path=hf_dir)
        hist += train(engine, [2], layout, trace)
        out[(tp, pp, dp)] = {"hist": hist, "weights": full_weights(engine, layout), "logp": logp,
                             "grads": _grads(trace)}
    for tp, pp, dp in [(1, 2, 1), (1, 1, 2)]:  # resume the (2,1,1) checkpoint at another layout
        layout = Layout.create(tp, pp, dp)
        engine = build_engine(layout, hf_dir)
        info = load_checkpoint(engine, f"{ckpt_root}/plain")
        trace = []
        out[("resume", tp, pp, dp)] = {"hist": train(engine, [info["data_state"]["next_step"]], layout, trace),
                                       "weights": full_weights(engine, layout), "step": info["step"],
                                       "grads": _grads(trace)}
    layout = Layout.create(1, 2, 1)  # tied embeddings split over two stages, then resumed at tp=2, pp=1
    engine = build_engine(layout, hf_tied)
    trace = []
    hist = train(engine, [0, 1], layout, trace)
    save_checkpoint(engine, f"{ckpt_root}/tied", 2)
    hist += train(engine, [2], layout, trace)
    head = engine.model.output_weight().detach().clone() if layout.is_last_stage else None
    out["tied"] = {"hist": hist, "weights": full_weights(engine, layout), "head": head, "grads": _grads(trace)}
    layout = Layout.create(2, 1, 1)
    engine = build_engine(layout, hf_tied)
    load_checkpoint(engine, f"{ckpt_root}/tied")
    trace = []
    out["tied_resume"] = {"hist": train(engine, [2], layout, trace), "weights": full_weights(engine, layout),
                          "grads": _grads(trace)}
    return out


def _reference(hf_dir: str, steps=3) -> dict:
    layout = Layout.create(1, 1, 1)  # world of one in the pytest process
    engine = build_engine(layout, hf_dir)
    logp, trace = log_probs(engine, layout, 0), []
    hist = train(engine, range(steps), layout, trace)
    return {"hist": hist, "weights": full_weights(engine, layout), "logp": logp, "trace": trace}


def _check_weights(ref: dict, grads: list[dict], hist: list, weights: dict) -> None:
    bound = adamw_weight_bound(ref["trace"], ref["hist"], grads, hist, ref["weights"], optim_config())
    assert_weights_within(weights, ref["weights"], bound, ref["hist"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine2")
    hf_dir, hf_tied = make_hf_dir(str(root / "hf")), make_hf_dir(str(root / "hf_tied"), tie=True)
    ranks = run_distributed(_suite, 2, hf_dir, hf_tied, str(root / "ckpt"), timeout_s=420)
    return {"ranks": ranks, "ref": _reference(hf_dir), "ref_tied": _reference(hf_tied)}


@pytest.mark.parametrize("sizes", LAYOUTS)
def test_layout_matches_single_process(runs, sizes):
    ref = runs["ref"]
    per_rank = [r[sizes] for r in runs["ranks"]]
    for r in per_rank:  # every rank reports the same metrics
        assert history_diff(r["hist"], ref["hist"]) < HIST_RTOL, (r["hist"], ref["hist"])
    grads = [merge(step) for step in zip(*[r["grads"] for r in per_rank])]
    assert_grads_close(grads, _grads(ref["trace"]))
    _check_weights(ref, grads, per_rank[0]["hist"], merge([r["weights"] for r in per_rank]))
    dp = sizes[2]
    for rank, r in enumerate(per_rank):  # forward_only outputs on every rank = this dp rank's reference rows
        got = torch.cat(r["logp"])
        dp_rank = rank % dp if dp > 1 else 0
        want = torch.cat(ref["logp"])[dp_rank * 8 // dp:(dp_rank + 1) * 8 // dp]
        assert torch.allclose(got, want, atol=LOGP_ATOL, rtol=0)


def test_tied_embeddings_over_two_stages(runs):
    ref = runs["ref_tied"]
    first, last = runs["ranks"][0]["tied"], runs["ranks"][1]["tied"]
    assert history_diff(first["hist"], ref["hist"]) < HIST_RTOL
    grads = [merge(step) for step in zip(first["grads"], last["grads"])]
    assert_grads_close(grads, _grads(ref["trace"]))
    _check_weights(ref, grads, first["hist"], merge([first["weights"], last["weights"]]))
    # the last stage's head copy stayed equal to the first stage's embedding
    assert torch.equal(last["head"][:120], first["weights"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("sizes", [(1, 2, 1), (1, 1, 2)])
def test_checkpoint_from_tp2_resumes_at_other_layout(runs, sizes):
    ref = runs["ref"]
    per_rank = [r[("resume", *sizes)] for r in runs["ranks"]]
    source = runs["ranks"][0][(2, 1, 1)]  # steps 0-1 ran at (2,1,1), step 2 at `sizes`
    assert per_rank[0]["step"] == 2
    for r in per_rank:
        assert history_diff(r["hist"], ref["hist"][2:]) < HIST_RTOL, (r["hist"], ref["hist"][2:])
    grads = source["grads"][:2] + [merge(step) for step in zip(*[r["grads"] for r in per_rank])]
    assert_grads_close(grads, _grads(ref["trace"]))
    _check_weights(ref, grads, source["hist"][:2] + per_rank[0]["hist"], merge([r["weights"] for r in per_rank]))


def test_tied_checkpoint_from_pp2_resumes_at_tp2(runs):
    ref = runs["ref_tied"]
    source = runs["ranks"]
    r = source[0]["tied_resume"]
    assert history_diff(r["hist"], ref["hist"][2:]) < HIST_RTOL
    steps01 = [merge(step) for step in zip(source[0]["tied"]["grads"], source[1]["tied"]["grads"])][:2]
    grads = steps01 + r["grads"]
    assert_grads_close(grads, _grads(ref["trace"]))
    _check_weights(ref, grads, source[0]["tied"]["hist"][:2] + r["hist"], r["weights"])
