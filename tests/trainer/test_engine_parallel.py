"""TrainEngine on 2 gloo ranks: (tp, pp, dp) in {(2,1,1), (1,2,1), (1,1,2)} (+ tied embeddings at pp=2)
reproduce the single-process run (3 AdamW steps, 4 micro-batches, left padding); checkpoints saved
at one layout resume at another. One spawn runs everything; tests assert on its results.

Tolerances: losses / grad norms / lr relative 1e-5; weights and log-probs absolute 1e-5 (fp32,
only the reduction order differs)."""

import pytest
import torch

from _engine_cases import (build_engine, full_weights, history_diff, log_probs, make_hf_dir, max_diff, merge, train)
from verl_mega.parallel import Layout
from verl_mega.testing import run_distributed
from verl_mega.trainer.checkpoint import load_checkpoint, save_checkpoint

LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
TOL = 1e-5


def _suite(hf_dir: str, hf_tied: str, ckpt_root: str) -> dict:
    out = {}
    for tp, pp, dp in LAYOUTS:  # parity; (2,1,1) also saves after step 2
        layout = Layout.create(tp, pp, dp)
        engine = build_engine(layout, hf_dir)
        hist = train(engine, [0, 1], layout)
        if (tp, pp, dp) == (2, 1, 1):
            save_checkpoint(engine, f"{ckpt_root}/plain", 2, data_state={"next_step": 2}, tokenizer_path=hf_dir)
        hist += train(engine, [2], layout)
        out[(tp, pp, dp)] = {"hist": hist, "weights": full_weights(engine, layout),
                             "logp": log_probs(engine, layout, 0)}
    for tp, pp, dp in [(1, 2, 1), (1, 1, 2)]:  # resume the (2,1,1) checkpoint at another layout
        layout = Layout.create(tp, pp, dp)
        engine = build_engine(layout, hf_dir)
        info = load_checkpoint(engine, f"{ckpt_root}/plain")
        out[("resume", tp, pp, dp)] = {"hist": train(engine, [info["data_state"]["next_step"]], layout),
                                       "weights": full_weights(engine, layout), "step": info["step"]}
    layout = Layout.create(1, 2, 1)  # tied embeddings split over two stages, then resumed at tp=2, pp=1
    engine = build_engine(layout, hf_tied)
    hist = train(engine, [0, 1], layout)
    save_checkpoint(engine, f"{ckpt_root}/tied", 2)
    hist += train(engine, [2], layout)
    head = engine.model.output_weight().detach().clone() if layout.is_last_stage else None
    out["tied"] = {"hist": hist, "weights": full_weights(engine, layout), "head": head}
    layout = Layout.create(2, 1, 1)
    engine = build_engine(layout, hf_tied)
    load_checkpoint(engine, f"{ckpt_root}/tied")
    out["tied_resume"] = {"hist": train(engine, [2], layout), "weights": full_weights(engine, layout)}
    return out


def _reference(hf_dir: str, steps=3) -> dict:
    layout = Layout.create(1, 1, 1)  # world of one in the pytest process
    engine = build_engine(layout, hf_dir)
    hist = train(engine, range(steps), layout)
    return {"hist": hist, "weights": full_weights(engine, layout), "logp": log_probs(engine, layout, 0)}


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
        assert history_diff(r["hist"], ref["hist"]) < TOL, (r["hist"], ref["hist"])
    assert max_diff(merge([r["weights"] for r in per_rank]), ref["weights"]) < TOL
    dp = sizes[2]
    for rank, r in enumerate(per_rank):  # forward_only outputs on every rank = this dp rank's reference rows
        got = torch.cat(r["logp"])
        dp_rank = rank % dp if dp > 1 else 0
        want = torch.cat(ref["logp"])[dp_rank * 8 // dp:(dp_rank + 1) * 8 // dp]
        assert torch.allclose(got, want, atol=TOL, rtol=0)


def test_tied_embeddings_over_two_stages(runs):
    ref = runs["ref_tied"]
    first, last = runs["ranks"][0]["tied"], runs["ranks"][1]["tied"]
    assert history_diff(first["hist"], ref["hist"]) < TOL
    assert max_diff(merge([first["weights"], last["weights"]]), ref["weights"]) < TOL
    # the last stage's head copy stayed equal to the first stage's embedding
    assert torch.equal(last["head"][:120], first["weights"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("sizes", [(1, 2, 1), (1, 1, 2)])
def test_checkpoint_from_tp2_resumes_at_other_layout(runs, sizes):
    ref = runs["ref"]
    per_rank = [r[("resume", *sizes)] for r in runs["ranks"]]
    assert per_rank[0]["step"] == 2
    for r in per_rank:
        assert history_diff(r["hist"], ref["hist"][2:]) < TOL, (r["hist"], ref["hist"][2:])
    assert max_diff(merge([r["weights"] for r in per_rank]), ref["weights"]) < TOL


def test_tied_checkpoint_from_pp2_resumes_at_tp2(runs):
    ref = runs["ref_tied"]
    r = runs["ranks"][0]["tied_resume"]
    assert history_diff(r["hist"], ref["hist"][2:]) < TOL
    assert max_diff(r["weights"], ref["weights"]) < TOL
