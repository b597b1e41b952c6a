"""TrainEngine on 4 gloo ranks: (2,2,1), (1,2,2) with tied embeddings, and (2,1,2) reproduce the
single-process run (3 AdamW steps, left padding, grad clipping, cosine LR). One spawn runs all
layouts one after another. Tolerance: relative 1e-5 on loss / grad norm / lr, absolute 1e-5 on weights."""

import pytest

from _engine_cases import build_engine, full_weights, history_diff, make_hf_dir, max_diff, merge, train
from verl_mega.parallel import Layout
from verl_mega.testing import run_distributed

CASES = [((2, 2, 1), False), ((1, 2, 2), True), ((2, 1, 2), False)]
TOL = 1e-5


def _suite(hf_dirs: dict) -> dict:
    out = {}
    for sizes, tied in CASES:
        layout = Layout.create(*sizes)
        engine = build_engine(layout, hf_dirs[tied])
        out[sizes] = {"hist": train(engine, range(3), layout), "weights": full_weights(engine, layout)}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine4")
    hf_dirs = {False: make_hf_dir(str(root / "hf")), True: make_hf_dir(str(root / "hf_tied"), tie=True)}
    ranks = run_distributed(_suite, 4, hf_dirs, timeout_s=420)
    refs = {}
    for tied, path in hf_dirs.items():
        layout = Layout.create(1, 1, 1)
        engine = build_engine(layout, path)
        refs[tied] = {"hist": train(engine, range(3), layout), "weights": full_weights(engine, layout)}
    return ranks, refs


@pytest.mark.parametrize("sizes,tied", CASES)
def test_layout_matches_single_process(runs, sizes, tied):
    ranks, refs = runs
    ref = refs[tied]
    for r in ranks:
        assert history_diff(r[sizes]["hist"], ref["hist"]) < TOL, (r[sizes]["hist"], ref["hist"])
    assert max_diff(merge([r[sizes]["weights"] for r in ranks]), ref["weights"]) < TOL
