"""Sequence parallelism at tp = 2 (gloo: torch 2.13 has reduce-scatter and all-gather-into-tensor) gives the numbers of
tp = 2 without it: logits and every gradient, padded and packed micro-batches, sequence lengths not a
multiple of tp (the decoder pads them), with and without full recompute. Plus the collectives alone
against their definitions. Tolerance 1e-5 (fp32): the same partial sums are added in a different grouping
(the norm-weight gradients are summed over the two sequence halves)."""

import torch
import torch.distributed as dist

from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.models.parallelize import apply_recompute, apply_sequence_parallel
from verl_mega.parallel import Layout
from verl_mega.parallel import sequence_parallel as sp
from verl_mega.testing import run_distributed
from verl_mega.trainer.packing import pack_microbatch

TOL = 1e-5
CONFIG = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, max_position_embeddings=64, attention_bias=True)


def _batch(packed: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (3, 9), generator=gen)
    mask = (torch.arange(9)[None] >= torch.tensor([0, 2, 4])[:, None]).long()  # 9 + 7 + 5 = 21 tokens: odd
    mb = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    return pack_microbatch(mb) if packed else mb


def _run(model, layout, mb):
    """Loss = mean square of the full logits at valid positions; returns (logits, full grads by name)."""
    model.zero_grad()
    logits = model(mb["input_ids"], mb["position_ids"], mb.get("attention_mask"), cu_seqlens=mb.get("cu_seqlens"))
    parts = [torch.empty_like(logits) for _ in range(layout.tp)]
    dist.all_gather(parts, logits.contiguous(), group=layout.tp_group)
    full = torch.cat(parts, dim=-1)[..., :60]  # [batch, seq, vocab]
    valid = full[0] if "cu_seqlens" in mb else full[mb["attention_mask"].bool()]
    logits_local = logits[0] if "cu_seqlens" in mb else logits[mb["attention_mask"].bool()]
    # d(loss)/d(local logits) is this rank's slice of the full loss gradient: backprop the local part only
    (logits_local[..., :model.true_vocab_size - model.vocab_start_index].float().pow(2).sum() / valid.numel()).backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if getattr(p, "tensor_model_parallel", False):
            gp = [torch.empty_like(g) for _ in range(layout.tp)]
            dist.all_gather(gp, g.contiguous(), group=layout.tp_group)
            g = torch.cat(gp, dim=p.partition_dim)
        grads[name] = g
    return valid.detach(), grads


def _suite():
    layout = Layout.create(2, 1, 1)
    out = {}
    for packed in (False, True):
        for recompute in ("none", "full"):
            results = []
            for seq_par in (False, True):
                model = DecoderModel(ModelConfig(**CONFIG), layout.tp_group, layer_range=(0, 2), has_embedding=True,
                                     has_head=True, init_seed=0)
                apply_sequence_parallel(model, seq_par)
                apply_recompute(model, recompute)
                shapes = []
                model.layers[0].register_forward_hook(lambda mod, args, output: shapes.append(tuple(output.shape)))
                results.append(_run(model, layout, _batch(packed)))
                results[-1] += (shapes[0],)
            out[(packed, recompute)] = results
    x = torch.arange(24.0).view(1, 4, 6) * (layout.tp_rank + 1)  # the collectives alone
    out["collectives"] = (sp.gather_from_sequence(x, layout.tp_group), sp.reduce_scatter_to_sequence(x, layout.tp_group),
                          sp.scatter_to_sequence(x, layout.tp_group))
    return out


def test_sequence_parallel_matches_tp2():
    ranks = run_distributed(_suite, 2, timeout_s=240)
    for r in ranks:
        for key, (plain, seq_par) in ((k, v) for k, v in r.items() if k != "collectives"):
            assert torch.allclose(plain[0], seq_par[0], atol=TOL, rtol=0), key
            seq = plain[2][1]  # layers run on half of the sequence, padded to a multiple of 2: 21 -> 22 / 9 -> 10
            assert seq_par[2][1] == (seq + 1) // 2, (plain[2], seq_par[2])
            for name, g in plain[1].items():
                assert torch.allclose(g, seq_par[1][name], atol=TOL, rtol=0), (key, name)
    x0, x1 = (torch.arange(24.0).view(1, 4, 6) * k for k in (1, 2))
    for rank, r in enumerate(ranks):
        gathered, reduced, scattered = r["collectives"]
        mine = (x0, x1)[rank]
        assert torch.equal(gathered, torch.cat([x0, x1], dim=1))
        assert torch.equal(reduced, (x0 + x1)[:, 2 * rank:2 * rank + 2])
        assert torch.equal(scattered, mine[:, 2 * rank:2 * rank + 2])
