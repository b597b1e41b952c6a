"""Packed-sequence attention kernels against padded SDPA: forward + backward time and agreement.

Run (GPU):  python benchmarks/varlen_attention.py               (Qwen2.5 0.5B / 1.5B attention shapes, bf16)
CPU check:  python benchmarks/varlen_attention.py --smoke       (tiny shapes, fp32, the "loop" kernel only)

Sequences of lengths uniform in [--min-len, --max-len] (seeded) fill a token budget (--tokens); each
kernel of `verl_mega.models.varlen_attention` ("varlen": torch's flash varlen, "flex": flex_attention
with a document mask, "loop": SDPA per sequence) runs causal GQA attention over the packed row, and
"padded" runs today's path (SDPA over [N, max_len] with a boolean padding mask; what the padded
micro-batches pay). Reported: ms per forward+backward (median of --iters), max |difference| of the
output to the "loop" kernel, and attention TFLOP/s counting only the causal useful work
(4 * heads * head_dim * sum(len^2) / 2 forward, x 2.5 with backward). Writes $OUT/varlen_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from verl_mega.models.varlen_attention import PackedSeqs, varlen_attend

SHAPES = {"0.5b": (14, 2, 64), "1.5b": (12, 2, 128)}  # (query heads, kv heads, head dim)


def lengths_for_budget(tokens: int, lo: int, hi: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while True:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        if sum(out) + n > tokens:
            return out or [n]
        out.append(n)


def padded_attend(q, k, v, lengths):
    """Today's padded path: [N, heads, max_len, D] with a bool mask (causal & key valid), GQA expanded."""
    n, m = len(lengths), max(lengths)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]

    def pad(x):  # [1, h, T, D] -> [N, h, max_len, D], right padding
        out = x.new_zeros(n, x.shape[1], m, d)
        start = 0
        for i, length in enumerate(lengths):
            out[i, :, :length] = x[0, :, start:start + length]
            start += length
        return out

    qp, kp, vp = pad(q), pad(k), pad(v)
    valid = torch.arange(m, device=q.device)[None] < torch.tensor(lengths, device=q.device)[:, None]  # [N, max_len]
    mask = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()[None, None] & valid[:, None, None, :]
    mask = mask | ~mask.any(-1, keepdim=True)
    kp, vp = (t[:, :, None].expand(n, hkv, hq // hkv, m, d).reshape(n, hq, m, d) for t in (kp, vp))
    return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)


def bench(fn, iters: int, device) -> float:
    times = []
    for _ in range(iters + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--min-len", type=int, default=160)
    p.add_argument("--max-len", type=int, default=1152)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kernels", default="varlen,flex,loop,padded")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {"tiny": (4, 2, 16)} if args.smoke else SHAPES
    if args.smoke:
        args.tokens, args.min_len, args.max_len, args.iters, args.kernels = 256, 8, 64, 2, "loop,padded"
    lengths = lengths_for_budget(args.tokens, args.min_len, args.max_len, seed=0)
    seqs = PackedSeqs.from_cu_seqlens(F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device))
    t = sum(lengths)
    print(f"device {device} {torch.__version__} dtype {dtype}: {len(lengths)} sequences, {t} tokens, "
          f"max {max(lengths)}")
    results = []
    for name, (hq, hkv, d) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, hq, t, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        k = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        v = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        ref = varlen_attend(q, k, v, seqs, "loop").detach()
        flops = 4 * hq * d * sum(n * n for n in lengths) / 2 * 3.5  # fwd (2 matmuls) + bwd (5 matmuls ~ 2.5x)
        for kernel in args.kernels.split(","):
            def run():
                if kernel == "padded":
                    out = padded_attend(q, k, v, lengths)
                else:
                    out = varlen_attend(q, k, v, seqs, kernel)
                out.float().sum().backward()
                return out
            try:
                out = run()
                if kernel == "padded":
                    out = torch.cat([out[i, :, :n] for i, n in enumerate(lengths)], dim=1)[None].transpose(1, 2)
                    out = out.reshape(1, t, hq * d)
                diff = (out.float() - ref.float()).abs().max().item()
                ms = bench(run, args.iters, device)
                row = {"shape": name, "kernel": kernel, "ms_fwd_bwd": round(ms, 3), "max_abs_diff_vs_loop": diff,
                       "tflops": round(flops / ms / 1e9, 1)}
            except Exception as exc:  # noqa: BLE001 - a kernel this torch/GPU lacks is reported, not fatal
                row = {"shape": name, "kernel": kernel, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(row)
            results.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "varlen_attention.json"), "w") as f:
        json.dump({"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                   "torch": torch.__version__, "lengths": lengths, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
