"""1F1B schedule, p2p, data parallel and ZeRO-1 on a toy stage model (stacked Linear+tanh layers split
into stages; no megatron, so the 4-rank spawn is cheap). Micro-batches have different sequence
lengths (the p2p shape headers). References: the same engine at world size 1 in the pytest process.

Checks: (1,4,1) pipeline and (1,2,2) / (1,1,4) data parallel reproduce the single-process loss,
grad norm and weights (fp32, tolerance 1e-5); the 1F1B order on each stage (warm-up length,
alternation, at most pp - s micro-batches in flight); p2p of several dtypes/ranks; forward-only
outputs broadcast to every stage; a silent peer raises PipelineCommError naming it after the timeout.
"""

import time

import pytest
import torch
from torch import nn

from verl_mega.parallel import Layout
from verl_mega.parallel.p2p import PipeComm, PipelineCommError, broadcast_tensor_dicts
from verl_mega.testing import run_distributed
from verl_mega.trainer.engine import TrainEngine
from verl_mega.trainer.optim import OptimConfig

HIDDEN, LAYERS, STEPS = 8, 8, 2
SEQ_LENS = [3, 5, 2, 4, 6, 3, 2, 5]  # one per micro-batch (global order)


class ToyStage(nn.Module):
    """Layers [start, end) of a stack of Linear+tanh; identical weights for any split."""

    def __init__(self, start: int, end: int):
        super().__init__()
        self.start = start
        self.layers = nn.ModuleList()
        for i in range(start, end):
            gen = torch.Generator().manual_seed(i)
            layer = nn.Linear(HIDDEN, HIDDEN)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN ** 0.5)
                layer.bias.copy_(0.1 * torch.randn(HIDDEN, generator=gen))
            self.layers.append(layer)

    def hf_name(self, name: str) -> str:
        idx, rest = name.split(".", 2)[1:]
        return f"layers.{int(idx) + self.start}.{rest}"

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def microbatches(step: int, dp: int, dp_rank: int) -> list[dict]:
    out = []
    for i, s in enumerate(SEQ_LENS):
        gen = torch.Generator().manual_seed(1000 * step + i)
        out.append({"x": torch.randn(2, s, HIDDEN, generator=gen), "y": torch.randn(2, s, HIDDEN, generator=gen),
                    "loss_mask": (torch.rand(2, s, generator=gen) > 0.3).float()})
    per = len(out) // dp
    return out[dp_rank * per:(dp_rank + 1) * per]


def forward_step(model, mb, input_tensor):
    return model(mb["x"] if input_tensor is None else input_tensor)


def loss_fn(out, mb):
    return (((out - mb["y"]) ** 2).sum(-1) * mb["loss_mask"]).sum(), {"out_mean": out.detach().mean()}


def make_engine(layout):
    per = LAYERS // layout.pp
    model = ToyStage(layout.pp_rank * per, (layout.pp_rank + 1) * per)
    config = OptimConfig(lr=1e-2, warmup_steps=1, clip_grad=0.5, weight_decay=0.1)
    return TrainEngine(model, layout, config, bucket_mb=0.0005)  # ~130 floats per bucket: several buckets


def run_layout(layout, record: list | None = None) -> dict:
    engine = make_engine(layout)
    step_fn = forward_step
    if record is not None:
        def step_fn(model, mb, input_tensor):
            out = forward_step(model, mb, input_tensor)
            idx = sum(1 for e in record if e[0] == "F")
            record.append(("F", idx))
            out.register_hook(lambda g: record.append(("B", idx)))
            return out
    hist = []
    for step in range(STEPS):
        if record is not None:
            record.clear()  # keep the last step's events
        mbs = microbatches(step, layout.dp, layout.dp_rank)
        metrics = engine.forward_backward(mbs, loss_fn, forward_step=step_fn)
        hist.append((metrics["loss"], engine.optimizer_step()["grad_norm"]))
    outs = engine.forward_only(microbatches(0, layout.dp, layout.dp_rank),
                               lambda out, mb: {"out": out, "n": mb["loss_mask"].sum().long()}, forward_step=forward_step)
    weights = {engine.model.hf_name(n): p.detach().clone() for n, p in engine.model.named_parameters()}
    return {"hist": hist, "weights": weights if layout.dp_rank == 0 else {}, "outs": outs,
            "owned": len(engine.zero.owned), "total": len(engine.zero.params)}


def _suite() -> dict:
    import torch.distributed as dist
    res = {}
    layout = Layout.create(1, 4, 1)
    events = []
    res["pp4"] = run_layout(layout, record=events)
    res["events"] = list(events)  # the last training step's schedule on this stage
    comm = PipeComm(layout, torch.device("cpu"))
    sent = [torch.arange(6, dtype=torch.int64).view(2, 3) * (layout.rank + 1), torch.randn(4, 1, 2).bfloat16() > 0,
            torch.full((3,), float(layout.rank), dtype=torch.bfloat16)]
    got = []
    for t in sent:  # each stage sends to the next while receiving from the previous
        got.append(comm.exchange(sends=[(t, comm.next_rank)] if comm.next_rank is not None else [],
                                 recv_from=[comm.prev_rank] if comm.prev_rank is not None else []))
    res["p2p"] = (sent, got)
    items = [{"a": torch.tensor([1.5, 2.5]), "b": torch.arange(3)}] if layout.is_last_stage else None
    res["bcast"] = broadcast_tensor_dicts(items, layout.last_stage_rank, layout.pp_group, torch.device("cpu"))
    for sizes in [(1, 2, 2), (1, 1, 4)]:
        res[sizes] = run_layout(Layout.create(*sizes))
    # a silent peer: stage 1 waits for a gradient that stage 2 never sends
    comm = PipeComm(Layout.create(1, 4, 1), torch.device("cpu"), timeout_s=2)
    if dist.get_rank() == 1:
        t0 = time.monotonic()
        try:
            comm.recv_backward()
            res["timeout"] = None
        except PipelineCommError as exc:
            res["timeout"] = (str(exc), time.monotonic() - t0)
    elif dist.get_rank() == 2:
        time.sleep(4)
    return res


@pytest.fixture(scope="module")
def runs():
    ranks = run_distributed(_suite, 4, timeout_s=300)
    ref = run_layout(Layout.create(1, 1, 1))
    return ranks, ref


def _check(per_rank: list[dict], ref: dict) -> None:
    for r in per_rank:
        for (l, n), (rl, rn) in zip(r["hist"], ref["hist"]):
            assert abs(l - rl) < 1e-5 * rl and abs(n - rn) < 1e-5 * rn, (r["hist"], ref["hist"])
    merged = {}
    for r in per_rank:
        merged.update(r["weights"])
    assert merged.keys() == ref["weights"].keys()
    for k, v in merged.items():
        assert (v - ref["weights"][k]).abs().max().item() < 1e-5, k


def test_pipeline_pp4_matches_single_process(runs):
    ranks, ref = runs
    _check([r["pp4"] for r in ranks], ref)
    for r in ranks:  # forward_only outputs reach every stage
        assert len(r["pp4"]["outs"]) == len(SEQ_LENS)
        for got, want in zip(r["pp4"]["outs"], ref["outs"]):
            assert torch.allclose(got["out"], want["out"], atol=1e-6) and torch.equal(got["n"], want["n"])


@pytest.mark.parametrize("sizes", [(1, 2, 2), (1, 1, 4)])
def test_data_parallel_zero1_matches_single_process(runs, sizes):
    ranks, ref = runs
    _check([r[sizes] for r in ranks], ref)
    owned = [r[sizes]["owned"] for r in ranks]
    assert all(0 < o < r[sizes]["total"] for o, r in zip(owned, ranks))  # optimizer state is sharded


def test_1f1b_order(runs):
    ranks, _ = runs
    pp, m = 4, len(SEQ_LENS)
    for stage, r in enumerate(ranks):
        events = r["events"]
        kinds = "".join(e[0] for e in events)
        warm = min(pp - stage - 1, m)
        assert kinds == "F" * warm + "FB" * (m - warm) + "B" * warm, (stage, kinds)
        assert [e[1] for e in events if e[0] == "B"] == list(range(m))  # backward in micro-batch order
        in_flight = max(kinds[:i].count("F") - kinds[:i].count("B") for i in range(len(kinds) + 1))
        assert in_flight == min(pp - stage, m)


def test_p2p_shapes_dtypes_and_broadcast(runs):
    ranks, _ = runs
    for rank in range(1, 4):
        sent_prev = ranks[rank - 1]["p2p"][0]
        for t, got in zip(sent_prev, ranks[rank]["p2p"][1]):
            assert got[0].dtype == t.dtype and torch.equal(got[0], t)
    for r in ranks:
        assert torch.equal(r["bcast"][0]["a"], torch.tensor([1.5, 2.5])) and torch.equal(r["bcast"][0]["b"], torch.arange(3))


def test_silent_peer_times_out_naming_it(runs):
    ranks, _ = runs
    message, waited = ranks[1]["timeout"]
    assert "with rank 2" in message and "VERL_MEGA_DIST_TIMEOUT" in message
    assert 1.5 < waited < 10
