"""TrainEngine on 4 gloo ranks: (2,2,1), (1,2,2) with tied embeddings, and (2,1,2) reproduce the
single-process run (3 AdamW steps, left padding, grad clipping, cosine LR). One spawn runs all
layouts one after another. Tolerances as in test_engine_parallel.py: gradients GRAD_RTOL of max |g|,
loss / grad norm / lr HIST_RTOL relative, weights within the per-element AdamW bound
(`_engine_cases.adamw_weight_bound`)."""

import pytest

from _engine_cases import (HIST_RTOL, adamw_weight_bound, assert_grads_close, assert_weights_within, build_engine,
                           full_weights, history_diff, make_hf_dir, merge, optim_config, train)
from verl_mega.parallel import Layout
from verl_mega.testing import run_distributed

CASES = [((2, 2, 1), False), ((1, 2, 2), True), ((2, 1, 2), False)]


def _run(layout: Layout, hf_dir: str) -> dict:
    engine, trace = build_engine(layout, hf_dir), []
    hist = train(engine, range(3), layout, trace)
    return {"hist": hist, "weights": full_weights(engine, layout), "trace": trace}


def _suite(hf_dirs: dict) -> dict:
    return {sizes: _run(Layout.create(*sizes), hf_dirs[tied]) for sizes, tied in CASES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine4")
    hf_dirs = {False: make_hf_dir(str(root / "hf")), True: make_hf_dir(str(root / "hf_tied"), tie=True)}
    ranks = run_distributed(_suite, 4, hf_dirs, timeout_s=420)
    refs = {tied: _run(Layout.create(1, 1, 1), path) for tied, path in hf_dirs.items()}
    return ranks, refs


@pytest.mark.parametrize("sizes,tied", CASES)
def test_layout_matches_single_process(runs, sizes, tied):
    ranks, refs = runs
    ref = refs[tied]
    for r in ranks:
        assert history_diff(r[sizes]["hist"], ref["hist"]) < HIST_RTOL, (r[sizes]["hist"], ref["hist"])
    grads = [merge([step["grads"] for step in steps]) for steps in zip(*[r[sizes]["trace"] for r in ranks])]
    assert_grads_close(grads, [step["grads"] for step in ref["trace"]])
    bound = adamw_weight_bound(ref["trace"], ref["hist"], grads, ranks[0][sizes]["hist"], ref["weights"],
                               optim_config())
    assert_weights_within(merge([r[sizes]["weights"] for r in ranks]), ref["weights"], bound, ref["hist"])
