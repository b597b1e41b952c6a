"""HybridEngine resharding on gloo ranks: (tp=2, pp=2) training -> tp_g in {1, 2} (packed path),
(tp=2, dp=2) -> tp_g=1 and tp=4 -> tp_g in {1, 2} (direct path, also with the grouped NCCL-style
launch that gloo offers on torch 2.13, and forced packed), against the full single-process model
(same seeded weights, `DecoderModel.init_weights` is layout-independent); `comm.gather_into` in both
forms against torch.cat.

Tolerances: weights must be bit-identical (resharding only moves bytes); logits exact for tp_g=1
(same ops as the reference), 1e-5 fp32 for tp_g=2 (row-parallel all-reduce changes summation order).
All checks of one world size run in one spawn (imports cost ~10 s per spawn).
"""

import time
import weakref

import pytest
import torch
import torch.distributed as dist

from verl_mega.hybrid_engine.comm import gather_into
from verl_mega.hybrid_engine.plan import SLOT_ALIGN
from verl_mega.hybrid_engine.reshard import HybridEngine, NaiveGatherEngine, inference_model
from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.models.parallelize import build_stage
from verl_mega.parallel.layout import Layout
from verl_mega.testing import run_distributed

SEED = 3
BATCH, SEQ = 2, 5


def _config(tied: bool, vocab: int = 200, heads: int = 4, kv_heads: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=8 * heads, intermediate_size=48, num_layers=4, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=8, tie_word_embeddings=tied, attention_bias=not tied,
                       model_type="llama" if tied else "qwen2")


def _inputs(config: ModelConfig):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)
    return ids, torch.arange(SEQ).expand(BATCH, SEQ)


def _full_logits(model: DecoderModel, local: torch.Tensor) -> torch.Tensor:
    """Vocab-shard logits [B, S, V_pad/tp] -> full logits [B, S, V] (gathered over the model's TP group)."""
    parts = [torch.empty_like(local) for _ in range(model.tp)]
    dist.all_gather(parts, local.contiguous(), group=model.tp_group)
    return torch.cat(parts, dim=-1)[..., :model.true_vocab_size]


def _pipeline_logits(stage: DecoderModel, layout: Layout, ids, pos) -> torch.Tensor | None:
    """Training forward over the pipeline (pp=2 by send/recv); full logits on the last stage, else None."""
    if layout.pp == 1:
        return _full_logits(stage, stage(ids, pos))
    if layout.is_first_stage:
        hidden = stage(ids, pos)
        dist.send(hidden.contiguous(), layout.next_stage_rank)
        return None
    hidden = torch.empty(BATCH, SEQ, stage.config.hidden_size)
    dist.recv(hidden, layout.prev_stage_rank)
    return _full_logits(stage, stage(hidden, pos))


def _reference(config: ModelConfig, single_group) -> DecoderModel:
    return DecoderModel(config, single_group, layer_range=(0, config.num_layers), has_embedding=True,
                        has_head=True, init_seed=SEED)


def _released(refs: list, wait_s: float = 10.0) -> bool:
    """True once every weakly referenced storage is freed. Gloo's worker thread drops its reference to a
    finished collective (and so to its tensors) only after `work.wait()` has returned (ProcessGroupGloo::runLoop
    resets `workInProgress_` after `execute`), so the last bucket's storage may outlive `to_train()` by a
    thread switch: poll briefly; never call gc, which would hide a reference cycle."""
    deadline = time.monotonic() + wait_s
    while any(ref() is not None for ref in refs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _check_engine(engine, stage, layout, ref, ids, pos, ref_logits, tol) -> dict:
    model = engine.to_inference()
    assert model.tp == engine.inference_layout.tp_g and model.layer_range == (0, stage.config.num_layers)
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():  # bit-identical to the reference's tp_g slice
        full = ref_params[name]
        if model.is_vocab_param(name):  # zero rows up to the inference layout's padded vocabulary
            full = torch.cat([full, full.new_zeros(model.padded_vocab_size - full.shape[0], *full.shape[1:])])
        assert torch.equal(param, full[model.shard_slice(param)]), name
    err = (_full_logits(model, model(ids, pos)) - ref_logits).abs().max().item()
    assert err <= tol, f"inference logits differ by {err}"
    stats = engine.last_stats
    train_storages = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    gathered = [weakref.ref(p.untyped_storage()) for p in model.parameters()
                if p.untyped_storage().data_ptr() not in train_storages]  # buffers / flat generation shard
    engine.to_train()  # no gc.collect(): the memory must be freed by reference counting alone
    assert all(p.numel() == 0 for p in model.parameters()), "inference weights not released"
    assert _released(gathered), "gathered memory still referenced after to_train()"
    after = _pipeline_logits(stage, layout, ids, pos)
    return {"err": err, "stats": stats, "train_logits_after": after}


def _tp2_pp2_case(layout: Layout, tied: bool, inf_layouts: dict) -> dict:
    """(tp=2, pp=2) -> tp_g 1 and 2 (one bucket and ~4 KiB buckets), the naive baseline, the
    context-manager API, bad tp_g. `inf_layouts` caches generation groups across cases (group creation is slow)."""
    config = _config(tied)
    stage = build_stage(config, layout, init_seed=SEED)
    ids, pos = _inputs(config)
    train_before = _pipeline_logits(stage, layout, ids, pos)

    def engine(tp_g, cls=HybridEngine, **kw):
        eng = cls(stage, layout, config, tp_g=tp_g, inference_layout=inf_layouts.get(tp_g), **kw)
        inf_layouts[tp_g] = eng.inference_layout
        return eng

    engine1 = engine(1)
    ref = _reference(config, engine1.inference_layout.tp_g_group)  # its gen-TP groups are single ranks
    ref_logits = _full_logits(ref, ref(ids, pos))
    out = {"train_before": train_before, "ref": ref_logits,
           "train_bytes": sum(p.numel() * p.element_size() for p in stage.parameters())}
    out["tp_g1"] = _check_engine(engine1, stage, layout, ref, ids, pos, ref_logits, tol=0.0)
    out["tp_g2"] = _check_engine(engine(2), stage, layout, ref, ids, pos, ref_logits, tol=1e-5)
    if tied:
        return out
    for tp_g in (1, 2):  # ~4 KiB buckets: many all-gathers, pipelined with the assembly
        out[f"bucketed{tp_g}"] = _check_engine(engine(tp_g, bucket_mb=1 / 256), stage, layout, ref, ids, pos,
                                               ref_logits, tol=1e-5)
    out["naive"] = _check_engine(engine(1, NaiveGatherEngine), stage, layout, ref, ids, pos, ref_logits, tol=0.0)
    with inference_model(stage, layout, tp_g=2) as (model, inf_layout):
        assert inf_layout.tp_g == 2 and inf_layout.micro_dp == 2 and model.tp == 2
        owned = {p.data_ptr() for p in stage.parameters()}
        # pp -> 1 with t_g = t: this rank's own stage is the training storage itself, no copy
        out["reused"] = sum(p.data_ptr() in owned for p in model.parameters())
    assert all(p.numel() == 0 for p in model.parameters())
    try:  # the micro-DP group spans both stages: no direct path
        HybridEngine(stage, layout, config, tp_g=1, inference_layout=inf_layouts[1], direct=True)
    except ValueError as exc:
        assert "direct" in str(exc)
    else:
        raise AssertionError("direct=True with pp=2 did not raise")
    for bad in (3, 4, 0):
        try:
            HybridEngine(stage, layout, config, tp_g=bad)
        except ValueError as exc:
            assert "tp_g" in str(exc)
        else:
            raise AssertionError(f"tp_g={bad} did not raise")
    return out


def _vocab_padding_case() -> dict:
    """Vocabulary padded differently for t and t_g (as for t not dividing 128): with the pad multiple
    set to 1, V=201 pads to 204 rows at tp=4, 202 at tp=2, 201 at tp=1 -> realign (tp_g=2), trim (tp_g=1)."""
    import verl_mega.models.config as model_config
    model_config.VOCAB_PAD_MULTIPLE = 1
    config = _config(tied=False, vocab=201, heads=4, kv_heads=4)
    assert (config.padded_vocab_size(4), config.padded_vocab_size(2), config.padded_vocab_size(1)) == (204, 202, 201)
    layout = Layout.create(tp=4, pp=1)
    stage = build_stage(config, layout, init_seed=SEED)
    ids, pos = _inputs(config)
    engine1 = HybridEngine(stage, layout, config, tp_g=1, direct=True)  # the CUDA default; gloo packs by default
    ref = _reference(config, engine1.inference_layout.tp_g_group)
    ref_logits = _full_logits(ref, ref(ids, pos))
    out = {"trim": _check_engine(engine1, stage, layout, ref, ids, pos, ref_logits, tol=1e-5)}
    engine2 = HybridEngine(stage, layout, config, tp_g=2, direct=True)
    out["realign"] = _check_engine(engine2, stage, layout, ref, ids, pos, ref_logits, tol=1e-5)
    packed = HybridEngine(stage, layout, config, tp_g=2, inference_layout=engine2.inference_layout)
    assert not packed._direct  # default on CPU/gloo
    out["realign_packed"] = _check_engine(packed, stage, layout, ref, ids, pos, ref_logits, tol=1e-5)
    return out


def _data_parallel_case() -> dict:
    """(tp=2, dp=2) -> tp_g=1: micro-DP groups stay inside each training DP replica; the naive
    baseline gathers both replicas over the world."""
    config = _config(tied=False)
    layout = Layout.create(tp=2, pp=1, dp=2)
    stage = build_stage(config, layout, init_seed=SEED)
    ids, pos = _inputs(config)
    engine = HybridEngine(stage, layout, config, tp_g=1, direct=True)
    assert engine.inference_layout.micro_dp_ranks == [2 * layout.dp_rank, 2 * layout.dp_rank + 1]
    assert engine.inference_layout.dp_g == 4
    ref = _reference(config, engine.inference_layout.tp_g_group)
    ref_logits = _full_logits(ref, ref(ids, pos))
    out = {"hybrid": _check_engine(engine, stage, layout, ref, ids, pos, ref_logits, tol=0.0)}
    inf = engine.inference_layout
    variants = {"coalesced": {"direct": True}, "bucketed": {"direct": True, "bucket_mb": 1 / 256}, "packed": {}}
    for key, kwargs in variants.items():
        eng = HybridEngine(stage, layout, config, tp_g=1, inference_layout=inf, **kwargs)
        eng.coalesced = key == "coalesced"  # the NCCL launch (allgather_into_tensor_coalesced), run on gloo
        assert eng._direct == (key != "packed")
        out[key] = _check_engine(eng, stage, layout, ref, ids, pos, ref_logits, tol=0.0)
        out[key]["chunk_numel"] = eng.chunk_numel
    out["chunk_numel"] = {True: engine.chunk_numel, False: out["packed"]["chunk_numel"]}
    naive = NaiveGatherEngine(stage, layout, config, tp_g=1, inference_layout=engine.inference_layout)
    out["naive"] = _check_engine(naive, stage, layout, ref, ids, pos, ref_logits, tol=0.0)
    tied = _config(tied=True)  # one embedding/head tensor, gathered once
    tied_stage = build_stage(tied, layout, init_seed=SEED)
    tied_ref = _reference(tied, inf.tp_g_group)
    tied_engine = HybridEngine(tied_stage, layout, tied, tp_g=1, inference_layout=inf, direct=True)
    out["tied"] = _check_engine(tied_engine, tied_stage, layout, tied_ref, ids, pos,
                                _full_logits(tied_ref, tied_ref(ids, pos)), tol=0.0)
    return out


def _gather_into_case() -> dict:
    """`gather_into` (list form and grouped launch) against torch.cat of every rank's inputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = [(3, 5), (7,), (2, 4, 3)]

    def tensor(r, shape, i):  # rank r's i-th input, known to every rank
        return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) * (i + 1) + 100 * r

    inputs = [tensor(rank, shape, i) for i, shape in enumerate(shapes)]
    out = {}
    for coalesced in (False, True):
        outputs = [torch.empty(world * shape[0], *shape[1:]) for shape in shapes]
        gather_into(outputs, inputs, dist.group.WORLD, coalesced=coalesced).wait()
        out[coalesced] = all(torch.equal(o, torch.cat([tensor(r, shape, i) for r in range(world)]))
                             for i, (o, shape) in enumerate(zip(outputs, shapes)))
    return out


def _worker() -> dict:
    torch.manual_seed(0)
    layout = Layout.create(tp=2, pp=2)
    inf_layouts = {}
    return {"gather_into": _gather_into_case(), "untied": _tp2_pp2_case(layout, False, inf_layouts),
            "tied": _tp2_pp2_case(layout, True, inf_layouts),
            "dp": _data_parallel_case(), "vocab": _vocab_padding_case()}


@pytest.fixture(scope="module")
def results():
    """One 4-rank spawn runs every case (each rank asserts weights/logits/release itself)."""
    return run_distributed(_worker, 4)


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_training_model_unchanged_after_round_trip(results, case):
    ref = results[0][case]["ref"]
    for res in results:
        res = res[case]
        assert torch.equal(res["ref"], ref)
        for key in ("tp_g1", "tp_g2", "bucketed1", "bucketed2", "naive"):
            after = res.get(key, {}).get("train_logits_after")
            if after is not None:  # last stage: same logits as before resharding, and as the full model
                assert torch.equal(after, res["train_before"])
                assert (after - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_inference_logits_match_full_model(results, case):
    for res in results:
        assert res[case]["tp_g1"]["err"] == 0.0 and res[case]["tp_g2"]["err"] <= 1e-5
        if case == "untied":
            assert res[case]["bucketed1"]["err"] == 0.0 and res[case]["bucketed2"]["err"] <= 1e-5
            assert res[case]["bucketed1"]["stats"].num_collectives > 3  # really several buckets


def test_vocab_padding_trim_and_realign(results):
    for res in results:
        assert res["vocab"]["trim"]["err"] <= 1e-5 and res["vocab"]["realign"]["err"] <= 1e-5
        assert res["vocab"]["realign"]["stats"].num_collectives == 3  # micro-DP gather + realign of embedding and head


def test_data_parallel_replicas(results):
    for res in results:
        hybrid, naive = res["dp"]["hybrid"]["stats"], res["dp"]["naive"]["stats"]
        assert hybrid.bytes_moved == hybrid.bytes_gathered // 2  # one other member: the other TP rank
        assert naive.bytes_moved == 3 * naive.bytes_gathered // 4  # three other ranks (both replicas)


def test_gather_into_both_forms(results):
    assert all(res["gather_into"] == {False: True, True: True} for res in results)


def test_direct_path_stats(results):
    """(tp=2, dp=2) -> tp_g=1 on the direct path: exact logits in every variant; it moves exactly the
    TP shards (the packed chunk adds the replicated tensors), one launch per bucket."""
    for res in results:
        dp = res["dp"]
        direct, packed, bucketed = dp["hybrid"]["stats"], dp["packed"]["stats"], dp["bucketed"]["stats"]
        for key in ("hybrid", "coalesced", "bucketed", "packed", "tied"):
            assert dp[key]["err"] == 0.0
        assert direct.num_collectives == 1 and direct.tensors_gathered > 10 and packed.tensors_gathered == 0
        assert bucketed.num_collectives > 3 and bucketed.tensors_gathered == direct.tensors_gathered
        assert direct.bytes_moved == bucketed.bytes_moved == dp["chunk_numel"][True] * 4  # fp32, one other member
        assert dp["chunk_numel"][True] < dp["chunk_numel"][False]
        # the paper's volume counts replicated tensors too; the direct path leaves them local
        assert 0.9 * direct.analytic_bytes <= direct.bytes_moved < packed.bytes_moved
        # both keep the training shard; the direct path shares the replicated tensors with it and pads
        # each slot to SLOT_ALIGN elements (on tiny shapes the padding dominates)
        assert abs(direct.redundant_bytes - packed.redundant_bytes) <= SLOT_ALIGN * 4 * direct.tensors_gathered
        assert res["vocab"]["realign_packed"]["err"] <= 1e-5


def test_own_stage_reuses_training_storage(results):
    assert all(res["untied"]["reused"] > 0 for res in results)


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_volumes_against_paper(results, case):
    """Hybrid receives (d_g - 1) padded chunks ~ the paper's (t·p - t_g)/(t_g·t·p)·M; naive more."""
    for res in results:
        s1, s2 = res[case]["tp_g1"]["stats"], res[case]["tp_g2"]["stats"]
        assert s1.num_collectives == 1 and s2.num_collectives == 1
        assert s1.analytic_bytes == pytest.approx(0.75 * s1.model_bytes)
        assert s2.analytic_bytes == pytest.approx(0.25 * s2.model_bytes)
        for s in (s1, s2):
            assert s.analytic_bytes <= s.bytes_moved <= 1.35 * s.analytic_bytes, s
        # t_g < t: buffer freed, generation shard freshly assembled -> exactly the kept training shard
        assert s1.redundant_bytes == res[case]["train_bytes"]
        # t_g = t: own stage reused in place, others are views of the buffer; its own chunk is the extra
        assert 0 <= s2.redundant_bytes <= res[case]["train_bytes"] + s2.bytes_gathered // 2
        if case == "untied":
            sn = res[case]["naive"]["stats"]
            assert sn.bytes_moved >= s1.bytes_moved and sn.redundant_bytes > s1.redundant_bytes
