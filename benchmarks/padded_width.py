"""Does a padded micro-batch's cost depend on its width's alignment? Forward + backward of one padded training
micro-batch (the decoder with its padding mask, then the fused log-prob kernel on the response columns, as the
update runs it) at several widths S = prompt + longest response, with the decoder's attention bias built two ways,
under SDPA's own backend choice and with one backend forced.

Why: in issue 14's A/B (benchmarks/results/h100_2026-12-07d) each padded step takes the same time (within a few
percent) in every call, yet steps differ by up to 35%; the fast steps are exactly those whose width is 1152 (a
multiple of 128), the slow ones 1148, 1150, 1151. One suspect is the additive attention bias [b, 1, S, S]: for
strides that are not multiples of 8, PyTorch's memory-efficient SDPA kernel pads a copy of it on every call
(`models/masks.py`), and the backends' eligibility checks look at the mask too. Bias modes: "aligned" =
`masks.attention_bias` (a view of 16-aligned rows), "plain" = the bias allocated at its own width (what the decoder
built before). Backends: "default" (SDPA's choice), "efficient", "cudnn", "math" (forced; one that cannot run the
call is reported with its error).

Run (GPU):  python benchmarks/padded_width.py              (0.5B shape, 16 rows, widths 1148..1168, 3 backends)
CPU check:  python benchmarks/padded_width.py --smoke      (a tiny fp32 model, widths 37 and 40; SDPA's choice, and
            the efficient backend, which a CPU cannot run: reported with its error)
Prints a table and writes it to $OUT (or --out)/padded_width.md, with padded_width.json: ms per micro-batch (median
of --iters) per width, backend and bias, and each against the aligned bias at the first width that is a multiple of
128 under the first backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.grpo_e2e import SHAPES, TINY, build_actor  # noqa: E402
from verl_mega.models import decoder as decoder_module  # noqa: E402
from verl_mega.models.masks import attention_bias, position_ids_from_mask  # noqa: E402
from verl_mega.parallel import Layout  # noqa: E402
from verl_mega.parallel.dist import init_distributed  # noqa: E402
from verl_mega.trainer.stages import response_logprobs  # noqa: E402


def plain_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention bias at its own width (rows of S elements: unaligned unless S % 8 == 0)."""
    return torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)


BIASES = {"aligned": attention_bias, "plain": plain_bias}
# SDPA's choice ("default") or one backend forced (a backend that cannot run the call is reported, not timed)
BACKENDS = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH}


def microbatch(rows: int, prompt_len: int, width: int, vocab: int, seed: int, device) -> dict:
    """A padded micro-batch [rows, width]: prompts of `prompt_len` tokens, responses right-padded to
    width - prompt_len with one row at full length (so the width is what the longest response makes it)."""
    gen = torch.Generator().manual_seed(seed)
    r = width - prompt_len
    lengths = torch.randint(1, r + 1, (rows,), generator=gen)
    lengths[0] = r
    ids = torch.randint(3, vocab, (rows, width), generator=gen)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[:, prompt_len:] = (torch.arange(r)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": position_ids_from_mask(mask).to(device), "responses": ids[:, prompt_len:].to(device)}


def time_pass(actor, mb: dict, iters: int, warmup: int) -> float:
    """Median ms of forward (return_hidden) + response log-probs + backward of -mean(log-prob)."""
    model, times = actor.model, []
    for i in range(warmup + iters):
        if mb["input_ids"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        hidden = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], return_hidden=True)
        lp, _ = response_logprobs(hidden, mb, model, None, 1.0, False)
        (-lp.mean()).backward()
        if mb["input_ids"].is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=16, help="sequences per micro-batch (the A/B's padded 0.5B size)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--widths", default="1148,1151,1152,1160,1168")
    p.add_argument("--backends", default="default,efficient,cudnn", help=f"comma-separated, of {sorted(BACKENDS)}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="CPU check: a tiny fp32 model, widths 37,40, 2 iterations")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/padded_width"))
    args = p.parse_args(argv)
    on_cuda = torch.cuda.is_available() and not args.smoke
    shape, dtype = (TINY, torch.float32) if args.smoke else (SHAPES[args.shape], torch.bfloat16)
    widths = [37, 40] if args.smoke else [int(w) for w in args.widths.split(",")]
    backends = ["default", "efficient"] if args.smoke else args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; choose from {sorted(BACKENDS)}")
    rows, prompt_len = (2, 8) if args.smoke else (args.rows, args.prompt_len)
    iters, warmup = (2, 1) if args.smoke else (args.iters, args.warmup)
    init_distributed(backend="gloo" if args.smoke else None)  # gloo: the model on the CPU even where a GPU is
    layout = Layout.create(1, 1)
    actor = build_actor(shape, layout, dtype)
    device = next(actor.model.parameters()).device
    results = []
    for width in widths:
        mb = microbatch(rows, prompt_len, width, shape["vocab_size"], width, device)
        for backend in backends:
            for name, build in BIASES.items():
                builds = []  # the decoder's calls of the bias build swapped in (proof the swap took effect)
                decoder_module.attention_bias = lambda mask, dtype, build=build: builds.append(1) or build(mask, dtype)
                try:
                    with sdpa_kernel(BACKENDS[backend]) if BACKENDS[backend] is not None else contextlib.nullcontext():
                        ms, error = time_pass(actor, mb, iters, warmup), None
                except RuntimeError as exc:  # e.g. "No available kernel": this backend cannot run the call
                    ms, error = None, str(exc).splitlines()[0][:200]
                finally:
                    decoder_module.attention_bias = attention_bias
                results.append({"width": width, "backend": backend, "bias": name, "ms": ms, "error": error,
                                "bias_builds": len(builds)})
    base = next((r["ms"] for r in results if r["width"] % 128 == 0 and r["bias"] == "aligned"
                 and r["backend"] == backends[0] and r["ms"]), next(r["ms"] for r in results if r["ms"]))
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    lines = [f"# padded micro-batch forward + backward by width ({'tiny' if args.smoke else args.shape}, {rows} rows, "
             f"prompt {prompt_len}, {device_name})", "",
             "| width | width % 8 | SDPA backend | bias | ms | vs the aligned bias at the first width % 128 == 0, "
             f"{backends[0]} backend (else the first row) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['width']} | {r['width'] % 8} | {r['backend']} | {r['bias']} | "
              + (f"{r['ms']:.2f} | {r['ms'] / base:.3f} |" if r["ms"] else f"- | {r['error']} |") for r in results]
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "padded_width.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "padded_width.json"), "w") as f:
        json.dump({"device": device_name, "args": vars(args), "results": results}, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
