"""First-step loss of every TPxPP layout on one batch against the single-process run (issue 20, item 2).

    python benchmarks/layout_parity.py --shape 1.5b --out ref             # tp = pp = dp = 1: bf16 and fp32
    torchrun --nproc-per-node 8 benchmarks/layout_parity.py --shape 1.5b --layouts 1x1,2x1,4x1,8x1,1x2,2x2,2x4 \
        --reference ref/layout_parity.json --out $OUT                     # dp = GPUs / (tp x pp)
    torchrun --nproc-per-node 2 benchmarks/layout_parity.py --smoke --layouts 1x1,2x1,1x2 --reference ...   # CPU

Every layout builds the same random-weight model (`DecoderModel.init_weights` draws each full tensor from a seed
and keeps this rank's slice) and runs one `TrainEngine.forward_backward` of the next-token loss on the same
global batch (seeded random ids, rows left-padded by different amounts, split over dp, `--micro-batches` per
step in all), then `optimizer_step` (its grad norm is taken before clipping). The loss is normalised by the
global token count, so it is the same quantity at every layout.

Tolerance (bf16), stated and derived from the reference run, which computes the loss in bf16 and in fp32:
a layout passes when |loss - loss_ref_bf16| <= max(4 x |loss_ref_bf16 - loss_ref_fp32|, 2^-8 x loss_ref_bf16 /
sqrt(N)), N = the loss tokens. Another layout sums the same bf16 products in other orders, so its loss differs
from the reference's by about sqrt(2) times what bf16 rounding moves the reference against fp32 (4x leaves room);
the floor is one bf16 unit in the last place per token, of independent sign, averaged over the N tokens of the
mean (in case the bf16 and fp32 losses agree by cancellation). fp32 layouts (`--dtypes float32`, the CPU check)
use 1e-5 relative. The grad norm is reported, not gated.

Rank 0 writes OUT/layout_parity.json and OUT/layout_parity.md (with the device and the command).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: benchmarks.*

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.throughput import SHAPES, parse_pairs  # noqa: E402
from verl_mega.models import ModelConfig, build_stage  # noqa: E402
from verl_mega.parallel import Layout  # noqa: E402
from verl_mega.parallel.dist import device as comm_device  # noqa: E402
from verl_mega.parallel.dist import init_distributed  # noqa: E402
from verl_mega.trainer.engine import TrainEngine, causal_lm_microbatches, next_token_loss  # noqa: E402
from verl_mega.trainer.optim import OptimConfig  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits: one unit in the last place relative to the value
FP32_RTOL = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.5b", help=f"model shape: {', '.join(SHAPES)}")
    p.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts (dp = world / (tp x pp)), or "
                                                     "'all': every tp x pp dividing the world that the shape splits into")
    p.add_argument("--dtypes", default=None, help="comma-separated bfloat16,float32 (default: both at world size 1, "
                                                  "else bfloat16; float32 on CPU)")
    p.add_argument("--batch", type=int, default=16, help="sequences in the global batch")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (left padding included)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step over all dp ranks")
    p.add_argument("--offload-optimizer", action="store_true", help="AdamW state on the host (a 7B reference run)")
    p.add_argument("--reference", default=None, help="layout_parity.json of the world-size-1 run to compare against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny shape, float32, batch 8 x 12")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.batch, args.seq, args.dtypes = "smoke", 8, 12, args.dtypes or "float32"
    if args.shape not in SHAPES:
        raise ValueError(f"--shape {args.shape!r}: choose from {', '.join(SHAPES)}")
    return args


def global_batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [batch, seq] and a left-padding mask (each row padded by 0 .. seq / 4 tokens), seeded."""
    gen = torch.Generator().manual_seed(args.seed + 100)
    ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=gen)
    pad = torch.randint(0, args.seq // 4 + 1, (args.batch,), generator=gen)
    mask = (torch.arange(args.seq)[None, :] >= pad[:, None]).long()
    return ids * mask, mask


def all_layouts(shape: dict, world: int) -> list[tuple[int, int]]:
    """Every (tp, pp) with tp x pp dividing `world`, tp splitting the shape's heads and pp <= its layers."""
    config, out = ModelConfig(**shape), []
    for tp in (t for t in range(1, world + 1) if world % t == 0):
        try:
            config.check_tp(tp)
        except ValueError:
            continue
        out += [(tp, pp) for pp in range(1, world // tp + 1) if (world // tp) % pp == 0 and pp <= config.num_layers]
    return out


def first_step(args, tp: int, pp: int, dtype: torch.dtype) -> dict:
    """(loss, grad norm) of one step of layout tp x pp x (world / (tp pp)) in `dtype`."""
    layout = Layout.create(tp, pp)
    if args.batch % layout.dp:  # (causal_lm_microbatches names an uneven micro-batch split)
        raise ValueError(f"--batch {args.batch} does not split over dp={layout.dp}")
    model = build_stage(ModelConfig(**SHAPES[args.shape]), layout, params_dtype=dtype, device=comm_device(),
                        init_seed=args.seed)
    engine = TrainEngine(model, layout, OptimConfig(lr=1e-5, clip_grad=1.0), param_dtype=dtype,
                         offload_optimizer=args.offload_optimizer)
    ids, mask = global_batch(args)
    per = args.batch // layout.dp
    rows = slice(layout.dp_rank * per, (layout.dp_rank + 1) * per)
    mbs = causal_lm_microbatches(ids[rows], mask[rows], max(1, args.micro_batches // layout.dp))
    loss = engine.forward_backward(mbs, next_token_loss(engine))["loss"]
    grad_norm = engine.optimizer_step()["grad_norm"]
    del engine, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"layout": f"{tp}x{pp}x{layout.dp}", "tp": tp, "pp": pp, "dp": layout.dp,
            "dtype": str(dtype).removeprefix("torch."), "loss": loss, "grad_norm": grad_norm}


def judge(results: list[dict], reference: dict) -> dict:
    """Each result's loss against the reference run's (module docstring's tolerance); adds the verdicts."""
    ref = {r["dtype"]: r for r in reference["results"] if r["layout"] == "1x1x1"}
    tol_bf16 = None
    if "bfloat16" in ref:
        bf16 = ref["bfloat16"]["loss"]
        tol_bf16 = BF16_ULP * abs(bf16) / math.sqrt(reference["loss_tokens"])
        if "float32" in ref:
            tol_bf16 = max(4 * abs(bf16 - ref["float32"]["loss"]), tol_bf16)
    for r in results:
        base = ref.get(r["dtype"])
        if base is None:
            r["verdict"] = "no reference in this dtype"
            continue
        tol = tol_bf16 if r["dtype"] == "bfloat16" else FP32_RTOL * abs(base["loss"])
        r["loss_diff"], r["tolerance"] = r["loss"] - base["loss"], tol
        r["grad_norm_rel_diff"] = r["grad_norm"] / base["grad_norm"] - 1
        r["verdict"] = "pass" if abs(r["loss_diff"]) <= tol else "FAIL"
    return {"tolerance_bf16": tol_bf16, "reference_losses": {k: v["loss"] for k, v in ref.items()}}


def markdown(report: dict) -> str:
    lines = [f"# First-step loss per layout ({report['world_size']} x {report['device']}, {report['date']})", "",
             f"`{report['command']}`", "",
             f"Shape {report['args']['shape']}, global batch {report['args']['batch']} x {report['args']['seq']} "
             f"tokens (left padding), {report['args']['micro_batches']} micro-batches per step.", "",
             "| layout (tp x pp x dp) | dtype | loss | grad norm | loss - reference | tolerance | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        diff = f"{r['loss_diff']:+.3e}" if "loss_diff" in r else "-"
        tol = f"{r['tolerance']:.3e}" if r.get("tolerance") is not None else "-"
        lines.append(f"| {r['layout']} | {r['dtype']} | {r['loss']:.6f} | {r['grad_norm']:.6f} | {diff} | {tol} "
                     f"| {r.get('verdict', '-')} |")
    if "judgement" in report:
        lines += ["", f"Reference (tp = pp = dp = 1) losses: {report['judgement']['reference_losses']}; bf16 tolerance "
                      f"max(4 x |bf16 - fp32|, 2^-8 x loss / sqrt({report['loss_tokens']} loss tokens)) = "
                      f"{report['judgement']['tolerance_bf16']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    init_distributed(backend=None if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    dtypes = (args.dtypes or ("float32" if not torch.cuda.is_available() else
                              "bfloat16,float32" if world == 1 else "bfloat16")).split(",")
    layouts = (all_layouts(SHAPES[args.shape], world) if args.layouts == "all"
               else parse_pairs(args.layouts, "--layouts", "x"))
    results = [first_step(args, tp, pp, DTYPES[d]) for tp, pp in layouts for d in dtypes]
    failed = False
    if dist.get_rank() == 0:
        report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                  "world_size": world, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": "benchmarks/layout_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "args": vars(args), "loss_tokens": int(causal_lm_microbatches(*global_batch(args))[0]["loss_mask"].sum()),
                  "results": results}
        if args.reference:
            with open(args.reference) as f:
                report["judgement"] = judge(results, json.load(f))
            failed = any(r["verdict"] == "FAIL" for r in results)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "layout_parity.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "layout_parity.md"), "w") as f:
            f.write(markdown(report))
        print(markdown(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
