"""Tuning tools for the fused log-prob kernels (issue 4): launch-configuration sweep and A/B timings.

Modes (GPU unless noted; results printed and written as JSON under $OUT, ./bench_out without it):
  (default)          launch configurations at one shape: the forward statistics kernel over the whole
                     vocabulary and the backward gradient kernel over one chunk, each checked against
                     fp32 torch; the same GEMMs with a trivial epilogue (what the softmax math costs);
                     cuBLAS GEMMs of the same shapes; the production kernels (fixed configurations)
  --epilogue         epilogue variants and timing probes (column mask, no exp2, no max, GEMM only)
  --group            tile order: GROUP_M = 8 / 32 / 128 row blocks per sweep of the vocabulary
  --overlap          one tile config with 1 or 2 programs per SM, full and GEMM-only epilogues
  --stages           3 vs 4 pipeline stages over a whole backward
  --chunks           whole forward + backward at several backward chunk widths, with peak memory
  --keep             whole forward + backward with / without the kept first chunk, and the 3 GEMMs
  --decompose        back-to-back times of the pieces of forward + backward and of the 3-GEMM baseline
  --gaps             host time to issue one forward + backward and the GPU's idle gaps (profiler)
  --host             host microseconds to issue each piece
  --profile          one launch of the first forward and backward configuration (run it under ncu)
  --interpret-check  (CPU, TRITON_INTERPRET=1) the variant kernels against the fp32 reference

The variant kernels wrap the production tile functions of `verl_mega.kernels.logprob_triton` with
device-side TMA descriptors, so that tile shapes, stages and Triton's warp specialisation can be
set per launch. Findings are summarised in benchmarks/results/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from verl_mega.kernels import fused_logprob_entropy  # noqa: E402
from verl_mega.kernels import logprob as lp_mod  # noqa: E402
from verl_mega.kernels import logprob_triton as lt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import back_to_back_ms as _loop_ms  # noqa: E402  (benchmarks/kernels.py)

LOG2E = 1.4426950408889634
SHAPE = (16384, 896, 151936)  # N, H, V: the harder shape


@triton.jit
def _fwd_probe(acc, pid_m, pid_n, m_ptr, s_ptr, u_ptr, N, scale2, BLOCK_M: tl.constexpr, NO_EXP: tl.constexpr,
               NO_MAX: tl.constexpr):
    """Timing probes of the forward epilogue (wrong numbers): without exp2 (e = d), or without the max pass."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if NO_MAX:
        m2 = tl.zeros((BLOCK_M,), tl.float32)
    else:
        m2 = tl.max(acc, axis=1) * scale2
    d2 = acc * scale2 - m2[:, None]
    e = d2 if NO_EXP else tl.exp2(d2)
    out = pid_n * N + rm
    tl.store(m_ptr + out, m2, mask=rm < N)
    tl.store(s_ptr + out, tl.sum(e, axis=1), mask=rm < N)
    tl.store(u_ptr + out, tl.sum(e * d2, axis=1), mask=rm < N)


@triton.jit
def _bwd_probe_no_exp(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, inv_temp,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Timing probe of the backward epilogue (wrong numbers): production without exp2 (p = the exponent)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rm < N
    lse2 = tl.load(lse_ptr + rm, mask=row_in, other=0.0) * 1.4426950408889634
    glp = tl.load(glp_ptr + rm, mask=row_in, other=0.0) * inv_temp
    gent = tl.load(gent_ptr + rm, mask=row_in, other=0.0) * inv_temp
    c = gent * tl.load(ez_ptr + rm, mask=row_in, other=0.0) - glp  # negated, as in production
    d = -gent * inv_temp
    scale2 = inv_temp * 1.4426950408889634
    HALF: tl.constexpr = BLOCK_N // 2
    a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
    g0 = (a0 * scale2 - lse2[:, None]) * (c[:, None] + d[:, None] * a0)
    g_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], g0.to(g_desc.dtype))
    g1 = (a1 * scale2 - lse2[:, None]) * (c[:, None] + d[:, None] * a1)
    g_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + HALF], g1.to(g_desc.dtype))


@triton.jit
def _fwd_variant(h_ptr, w_ptr, m_ptr, s_ptr, u_ptr, N, V, H: tl.constexpr, scale2, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr,
                 WS: tl.constexpr, EPI: tl.constexpr, UPCAST: tl.constexpr):
    """EPI=1: the production forward tile; EPI=0: the same GEMM with only a row sum as epilogue;
    EPI=2: production without the column mask (timing only: the last column block is then wrong);
    EPI=4, 5 (timing only, wrong numbers): no column mask and no exp2 / no max (see `_fwd_probe`)."""
    a_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, H], strides=[H, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[H, 1], block_shape=[BLOCK_N, BLOCK_K])
    if UPCAST:  # interpreter: one tile per program (it cannot loop over run-time bounds)
        lt._fwd_tile(a_desc, b_desc, None, tl.program_id(0), m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N,
                     BLOCK_K, GROUP_M, UPCAST, True, False, 1)
    else:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN, warp_specialize=WS):
            if EPI == 1 or EPI == 2:
                lt._fwd_tile(a_desc, b_desc, None, tile, m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N,
                             BLOCK_K, GROUP_M, UPCAST, EPI == 1, False, 1)
            elif EPI >= 4:
                pid_m, pid_n = lt._tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
                acc = lt._logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
                _fwd_probe(acc, pid_m, pid_n, m_ptr, s_ptr, u_ptr, N, scale2, BLOCK_M, EPI == 4, EPI == 5)
            else:
                pid_m, pid_n = lt._tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
                acc = lt._logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
                rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                tl.store(m_ptr + pid_n * N + rm, tl.sum(acc, axis=1), mask=rm < N)


@triton.jit
def _bwd_variant(h_ptr, w_ptr, g_ptr, ld_g, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, H: tl.constexpr,
                 inv_temp, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, SPLIT: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr,
                 EPI: tl.constexpr, UPCAST: tl.constexpr):
    """EPI=1: the production backward tile (no label term: `_label_grad_kernel` adds it); EPI=0: the
    same GEMM storing the raw logits (as cuBLAS would); EPI=2 (timing only, SPLIT=2): production
    without exp2."""
    a_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, H], strides=[H, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[H, 1], block_shape=[BLOCK_N, BLOCK_K])
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[N, V], strides=[ld_g, 1], block_shape=[BLOCK_M, BLOCK_N // SPLIT])
    if UPCAST:
        lt._bwd_tile(a_desc, b_desc, g_desc, tl.program_id(0), lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, H,
                     inv_temp, True, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST)
    else:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN, warp_specialize=WS):
            if EPI == 1:
                lt._bwd_tile(a_desc, b_desc, g_desc, tile, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, H, inv_temp,
                             True, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST)
            elif EPI == 2:
                pid_m, pid_n = lt._tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
                acc = lt._logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
                _bwd_probe_no_exp(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, inv_temp, BLOCK_M,
                                  BLOCK_N)
            else:
                pid_m, pid_n = lt._tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
                acc = lt._logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
                lt._store_tile(g_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_M, BLOCK_N, SPLIT)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM, warp specialisation)
FWD_CONFIGS = [
    (128, 256, 64, 8, 3, 1, False), (128, 256, 64, 8, 4, 1, False), (256, 128, 64, 8, 3, 1, False),
    (128, 128, 64, 8, 3, 2, False), (128, 128, 64, 4, 3, 2, False), (128, 128, 64, 4, 2, 2, False),
    (64, 256, 64, 4, 2, 2, False), (128, 128, 128, 8, 2, 2, False),
    (128, 128, 64, 4, 3, 1, True), (128, 128, 64, 4, 2, 2, True), (128, 256, 64, 8, 3, 1, True),
]
# (..., split epilogue stores)
BWD_CONFIGS = [
    (128, 256, 64, 8, 3, 1, False, 2), (128, 256, 64, 8, 3, 1, False, 1), (128, 256, 64, 8, 4, 1, False, 2),
    (256, 128, 64, 8, 3, 1, False, 1), (128, 128, 64, 8, 4, 1, False, 1),
    (128, 128, 64, 4, 2, 2, False, 1), (128, 128, 64, 4, 2, 2, False, 2), (128, 128, 64, 8, 2, 2, False, 1),
    (64, 256, 64, 4, 2, 2, False, 2), (128, 128, 64, 4, 3, 1, True, 1), (128, 256, 64, 8, 3, 1, True, 2),
]


def _alloc(size, align, stream):  # scratch for device-side TMA descriptors
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _median_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def _err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _inputs(n, hid, v, device="cuda", dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    h = torch.randn(n, hid, device=device).to(dtype)
    w = (torch.randn(v, hid, device=device) / hid**0.5 * 2).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    g_lp, g_ent = torch.randn(n, device=device) / 100, torch.randn(n, device=device) / 100
    return h, w, labels, g_lp, g_ent


def _reference_stats(h, w, inv_temp, rows):
    """fp32 lse and E[z] of the first `rows` rows."""
    z = (h[:rows].float() @ w.float().t()) * inv_temp
    lse = torch.logsumexp(z, dim=1)
    return lse, ((z - lse[:, None]).exp() * z).sum(1)


def _reference_grad(h, wc, lse, ez, g_lp, g_ent, lab, inv_temp, rows):
    """fp32 dL/d(raw logits) of the first `rows` rows for the columns wc (lab: column in the chunk or
    -1; None: without the label term, as the backward tile computes it)."""
    z = (h[:rows].float() @ wc.float().t()) * inv_temp
    p = (z - lse[:rows, None]).exp()
    g = -g_lp[:rows, None] * p - g_ent[:rows, None] * p * (z - ez[:rows, None])
    if lab is not None:
        r = torch.nonzero((lab[:rows] >= 0) & (lab[:rows] < wc.shape[0])).squeeze(1)
        g[r, lab[r].long()] += g_lp[r]
    return g * inv_temp


def _grid(tiles, per_sm, dev):
    return (tiles,) if dev.type != "cuda" else (min(tiles, per_sm * lt._num_sms(dev.index or 0)),)


def run_fwd(cfg, h, w, inv_temp, epi=1, group_m=8, interp=False):
    """Launch the forward variant; returns (launch fn, compiled kernel, lse, E[z]) (the last two for epi=1)."""
    bm, bn, bk, warps, stages, per_sm, ws = cfg
    n, hid = h.shape
    v = w.shape[0]
    tiles_n = triton.cdiv(v, bn)
    parts = torch.empty(3, tiles_n, n, device=h.device, dtype=torch.float32)
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, FLATTEN=not (ws or interp), WS=ws, EPI=epi,
              UPCAST=interp)
    if not interp:
        kw.update(num_warps=warps, num_stages=stages)
    grid = _grid(triton.cdiv(n, bm) * tiles_n, per_sm, h.device)

    def launch():
        return _fwd_variant[grid](h, w, parts[0], parts[1], parts[2], n, v, hid, inv_temp * LOG2E, **kw)
    compiled = launch()
    no_labels = torch.full((n,), -1, device=h.device, dtype=torch.int32)
    m, s, u, _ = lt._finish_rows(parts, tiles_n, h, w, no_labels, 0, inv_temp)
    return launch, compiled, m + s.log(), m + u / s


def run_bwd(cfg, h, wc, buf, lse, ez, g_lp, g_ent, inv_temp, epi=1, group_m=8, interp=False):
    """Launch the backward variant (the tile without the label term) into buf [N, >= V]."""
    bm, bn, bk, warps, stages, per_sm, ws, split = cfg
    n, hid = h.shape
    v = wc.shape[0]
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, SPLIT=split, FLATTEN=not (ws or interp), WS=ws,
              EPI=epi, UPCAST=interp)
    if not interp:
        kw.update(num_warps=warps, num_stages=stages)
    grid = _grid(triton.cdiv(n, bm) * triton.cdiv(v, bn), per_sm, h.device)

    def launch():
        return _bwd_variant[grid](h, wc, buf, buf.stride(0), lse, ez, g_lp, g_ent, n, v, hid, inv_temp, **kw)
    return launch, launch()


def _chunk_labels(labels, c0, width):
    return torch.where((labels >= c0) & (labels < c0 + width), labels - c0, -1).to(torch.int32)


def _write(name, report):
    out_dir = os.environ.get("OUT") or "bench_out"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1), flush=True)


def interpret_check():
    """Small shapes under TRITON_INTERPRET=1: both variants (split 1 and 2) against the fp32 reference."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    n, hid, v, inv_temp = 40, 64, 200, 1 / 0.7
    h, w, labels, g_lp, g_ent = _inputs(n, hid, v, device="cpu", dtype=torch.float32)
    lse_ref, ez_ref = _reference_stats(h, w, inv_temp, n)
    _, _, lse, ez = run_fwd((32, 64, 32, 4, 1, 1, False), h, w, inv_temp, interp=True)
    assert _err(lse, lse_ref) < 1e-5 and _err(ez, ez_ref) < 1e-5, (_err(lse, lse_ref), _err(ez, ez_ref))
    wc = w[:128]
    ref = _reference_grad(h, wc, lse_ref, ez_ref, g_lp, g_ent, None, inv_temp, n)
    for split in (1, 2):
        buf = torch.full((n, 128), float("nan"))
        run_bwd((32, 64, 32, 4, 1, 1, False, split), h, wc, buf, lse_ref, ez_ref, g_lp, g_ent, inv_temp, interp=True)
        assert _err(buf, ref) < 1e-5, (split, _err(buf, ref))
    print("interpreter check passed")


def sweep(chunk: int, only: str | None) -> dict:
    """Every configuration of FWD_CONFIGS / BWD_CONFIGS, checked and timed; GEMM-only rows; cuBLAS; production."""
    n, hid, v = SHAPE
    inv_temp, rows = 1.0, 256
    h, w, labels, g_lp, g_ent = _inputs(n, hid, v)
    wc = w[:chunk]
    buf = torch.empty(n, chunk, device="cuda", dtype=torch.bfloat16)
    lse_ref, ez_ref = _reference_stats(h, w, inv_temp, rows)
    report = {"gpu": torch.cuda.get_device_name(), "N": n, "H": hid, "V": v, "chunk": chunk, "fwd": [], "bwd": [],
              "cublas_full_gemm_ms": _median_ms(lambda: h @ w.t()),
              "cublas_chunk_gemm_ms": _median_ms(lambda: h @ wc.t())}
    m, s, u, zt, _ = lt.forward_stats(h, w, labels, 0, inv_temp)
    lse, ez = m + s.log(), m + u / s
    report["prod_forward_stats_ms"] = _median_ms(lambda: lt.forward_stats(h, w, labels, 0, inv_temp))
    report["prod_fwd_config"] = str(lt.gpu_config(n, True))
    lab = _chunk_labels(labels, 0, chunk)
    ref = _reference_grad(h, wc, lse, ez, g_lp, g_ent, lab, inv_temp, rows)
    report["prod_grad_logits_ms"] = _median_ms(lambda: lt.grad_logits(h, wc, buf, lse, ez, g_lp, g_ent, lab, zt, 0,
                                                                      inv_temp))
    report["prod_bwd_config"] = str(lt.gpu_config(n, False))
    report["prod_bwd_err"] = _err(buf[:rows], ref)
    ref_tile = _reference_grad(h, wc, lse, ez, g_lp, g_ent, None, inv_temp, rows)

    def row_of(kind, cfg, epi, fn):
        row = {"cfg": list(cfg), "epilogue": "production" if epi else "gemm_only"}
        try:
            row.update(fn())
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["error"] = "".join(traceback.format_exception_only(exc)).strip()[-300:]
        print(kind, json.dumps(row), flush=True)
        report[kind].append(row)

    def fwd(cfg, epi):
        launch, k, lse_v, ez_v = run_fwd(cfg, h, w, inv_temp, epi=epi)
        err = {"err": [_err(lse_v[:rows], lse_ref), _err(ez_v[:rows], ez_ref)]} if epi else {}
        return dict(regs=k.n_regs, spills=k.n_spills, smem=k.metadata.shared, ms=_median_ms(launch), **err)

    def bwd(cfg, epi):
        buf.fill_(float("nan"))
        launch, k = run_bwd(cfg, h, wc, buf, lse, ez, g_lp, g_ent, inv_temp, epi=epi)
        err = {"err": _err(buf[:rows], ref_tile), "unwritten": bool(buf.isnan().any())} if epi else {}
        return dict(regs=k.n_regs, spills=k.n_spills, smem=k.metadata.shared, ms=_median_ms(launch), **err)
    for cfg in FWD_CONFIGS if only in (None, "fwd") else []:
        row_of("fwd", cfg, 1, lambda: fwd(cfg, 1))
    for cfg in FWD_CONFIGS[:1] + FWD_CONFIGS[2:3] if only in (None, "fwd") else []:
        row_of("fwd", cfg, 0, lambda: fwd(cfg, 0))
    for cfg in BWD_CONFIGS if only in (None, "bwd") else []:
        row_of("bwd", cfg, 1, lambda: bwd(cfg, 1))
    for cfg in BWD_CONFIGS[:2] if only in (None, "bwd") else []:
        row_of("bwd", cfg, 0, lambda: bwd(cfg, 0))
    return report


def _bwd_setup(chunk):
    """Inputs at SHAPE, an [N, chunk] gradient buffer and plausible softmax statistics (lse, E[z])."""
    n, hid, v = SHAPE
    h, w, labels, g_lp, g_ent = _inputs(n, hid, v)
    buf = torch.empty(n, chunk, device="cuda", dtype=torch.bfloat16)
    lse, ez = torch.rand(n, device="cuda") + 12, torch.rand(n, device="cuda")
    return h, w, labels, g_lp, g_ent, buf, lse, ez


def group_ab(rounds=2) -> dict:
    """Tile order: GROUP_M row blocks per sweep of the vocabulary (forward) or of the chunk (backward)."""
    chunk = 8448
    h, w, labels, g_lp, g_ent, buf, lse, ez = _bwd_setup(chunk)
    wc = w[:chunk]
    out = {}
    for _ in range(rounds):
        for gm in (8, 32, 128):
            launch = run_fwd(FWD_CONFIGS[0], h, w, 1.0, group_m=gm)[0]
            out.setdefault(f"fwd_group_{gm}_ms", []).append(round(_median_ms(launch), 3))
            launch = run_bwd(BWD_CONFIGS[0], h, wc, buf, lse, ez, g_lp, g_ent, 1.0, group_m=gm)[0]
            out.setdefault(f"bwd_group_{gm}_ms", []).append(round(_median_ms(launch), 4))
    return out


def overlap_ab(rounds=3) -> dict:
    """Same tile (128 x 128, 4 warps, 3 stages) with 1 or 2 programs per SM: does overlapping one
    program's epilogue with the other's main loop pay? Forward over the vocabulary, backward chunk."""
    chunk = 8448
    h, w, labels, g_lp, g_ent, buf, lse, ez = _bwd_setup(chunk)
    out = {}
    for _ in range(rounds):
        for per_sm in (1, 2):
            for epi in (1, 0):
                launch = run_fwd((128, 128, 64, 4, 3, per_sm, False), h, w, 1.0, epi=epi)[0]
                out.setdefault(f"fwd_{per_sm}_per_sm_{'full' if epi else 'gemm_only'}_ms", []).append(
                    round(_median_ms(launch), 3))
                launch = run_bwd((128, 128, 64, 4, 3, per_sm, False, 2), h, w[:chunk], buf, lse, ez, g_lp, g_ent,
                                 1.0, epi=epi)[0]
                out.setdefault(f"bwd_{per_sm}_per_sm_{'full' if epi else 'gemm_only'}_ms", []).append(
                    round(_median_ms(launch), 4))
    return out


def stages_ab(chunk=8448, rounds=3) -> dict:
    """The backward kernel over all chunks, back to back, 3 vs 4 pipeline stages (128 x 256, split stores)."""
    v = SHAPE[2]
    h, w, labels, g_lp, _, buf, lse, ez = _bwd_setup(chunk)
    out = {}
    for _ in range(rounds):
        for stages in (3, 4):
            cfg = (128, 256, 64, 8, stages, 1, False, 2)
            launches = [run_bwd(cfg, h, w[c0:c0 + chunk], buf[:, :min(chunk, v - c0)], lse, ez, g_lp, g_lp, 1.0)[0]
                        for c0 in range(0, v, chunk)]
            ms = _loop_ms(lambda: [fn() for fn in launches])
            out.setdefault(f"stages_{stages}_ms", []).append(round(ms, 3))
    return out


def epilogue_ab(chunk=8448, rounds=7) -> dict:
    """Epilogue variants, back to back over a whole forward or backward, alternating rounds.

    Forward (whole vocabulary): production, without the column mask (timing only), timing probes
    without exp2 / without the max pass, GEMM only. Backward (all chunks): the tile alone,
    production `grad_logits` (tile + `_label_grad_kernel`), a probe without exp2, GEMM only.
    (Session 3 also timed the label term inside the tile and the session-2 forward epilogue: kernels.md.)
    """
    v = SHAPE[2]
    h, w, labels, g_lp, g_ent, buf, lse, ez = _bwd_setup(chunk)
    fwd = {name: run_fwd(FWD_CONFIGS[0], h, w, 1.0, epi=e)[0]
           for name, e in (("fwd_prod", 1), ("fwd_no_mask", 2), ("fwd_no_mask_no_exp", 4), ("fwd_no_mask_no_max", 5),
                           ("fwd_gemm_only", 0))}
    starts = list(range(0, v, chunk))
    lab32 = labels.to(torch.int32)

    def variant(epi):
        launches = [run_bwd(BWD_CONFIGS[0], h, w[c0:c0 + chunk], buf[:, :min(chunk, v - c0)], lse, ez, g_lp, g_ent,
                            1.0, epi=epi)[0] for c0 in starts]
        return lambda: [fn() for fn in launches]

    def production():
        for c0 in starts:
            wc = w[c0:c0 + chunk]
            lt.grad_logits(h, wc, buf[:, :wc.shape[0]], lse, ez, g_lp, g_ent, lab32, lse, c0, 1.0)
    bwd = {"bwd_tile": variant(1), "bwd_prod_with_label_kernel": production, "bwd_no_exp": variant(2),
           "bwd_gemm_only": variant(0)}
    out = {}
    for _ in range(rounds):
        for name, fn in {**fwd, **bwd}.items():
            out.setdefault(f"{name}_ms", []).append(round(_loop_ms(fn), 3))
    return out


def _fwd_bwd(h, w, labels, g_lp, g_ent, chunk=None):
    lp, ent = fused_logprob_entropy(h, w, labels, chunk_size=chunk)
    return torch.autograd.grad([lp, ent], [h, w], [g_lp, g_ent])


def chunks_ab(widths=(None, 12672, 16896), rounds=5) -> dict:
    """Whole forward + backward, back to back, at several backward chunk widths (alternating), with peak memory."""
    h, w, labels, g_lp, g_ent = _inputs(*SHAPE)
    h.requires_grad_()
    w.requires_grad_()
    out = {}
    for c in widths:
        _fwd_bwd(h, w, labels, g_lp, g_ent, c)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = _fwd_bwd(h, w, labels, g_lp, g_ent, c)
        kept = sum(t.numel() * t.element_size() for t in grads)
        out[f"extra_gib_{c}"] = (torch.cuda.max_memory_allocated() - base - kept) / 2**30
        del grads
    for _ in range(rounds):
        for c in widths:
            out.setdefault(f"ms_{c}", []).append(round(_loop_ms(lambda: _fwd_bwd(h, w, labels, g_lp, g_ent, c)), 3))
    acts = [torch.profiler.ProfilerActivity.CUDA]
    for _ in range(2):  # GPU time by kernel (profiler), less sensitive to queueing than the loop above
        for c in widths:
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(3):
                    _fwd_bwd(h, w, labels, g_lp, g_ent, c)
                torch.cuda.synchronize()
            kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            out.setdefault(f"kernel_ms_{c}", []).append(_kernel_totals(kern, 3)["sum"])
    return out


def keep_ab(rounds=7) -> dict:
    """Whole forward + backward, back to back: the forward keeping the first chunk's logits at the
    default width (production) and at 8448 columns, and recomputing every chunk (default width
    without keeping: 8448 at N=16384 on 132 SMs), alternating with the 3 cuBLAS GEMMs; peak extra
    memory and profiler kernel sums of each."""
    logprob = lp_mod
    h, w, labels, g_lp, g_ent = _inputs(*SHAPE)
    h.requires_grad_()
    w.requires_grad_()
    g = torch.randn(h.shape[0], w.shape[0], device="cuda", dtype=torch.bfloat16)
    hd, wd = h.detach(), w.detach()
    variants = {"keep": (None, True), "keep_8448": (8448, True), "recompute": (None, False)}

    def run(name):
        chunk, keep = variants[name]
        logprob.KEEP_FIRST_CHUNK = keep
        try:
            return _fwd_bwd(h, w, labels, g_lp, g_ent, chunk)
        finally:
            logprob.KEEP_FIRST_CHUNK = True
    out = {}
    for name in variants:
        run(name)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = run(name)
        kept = sum(t.numel() * t.element_size() for t in grads)
        out[f"extra_gib_{name}"] = (torch.cuda.max_memory_allocated() - base - kept) / 2**30
        del grads
    ref = run("recompute")
    for a, b, key in zip(run("keep"), ref, ("grad_h", "grad_w")):
        out[f"keep_vs_recompute_{key}_max_rel"] = _err(a, b)
    del ref
    for _ in range(rounds):
        out.setdefault("ms_three_gemms", []).append(round(_loop_ms(lambda: (hd @ wd.t(), g @ wd, g.t() @ hd)), 3))
        for name in variants:
            out.setdefault(f"ms_{name}", []).append(round(_loop_ms(lambda: run(name)), 3))
    for name in variants:
        out[f"median_ratio_{name}"] = statistics.median(o / b for o, b in zip(out[f"ms_{name}"], out["ms_three_gemms"]))
    acts = [torch.profiler.ProfilerActivity.CUDA]
    for _ in range(2):  # GPU time by kernel (profiler), less sensitive to queueing than the loop above
        for name in variants:
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(3):
                    run(name)
                torch.cuda.synchronize()
            kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            out.setdefault(f"kernel_ms_{name}", []).append(_kernel_totals(kern, 3))
    return out


def decompose(chunk=8192, reps=2) -> dict:
    """Back-to-back times of the pieces of forward + backward, and of the 3-GEMM baseline."""
    n, hid, v = SHAPE
    h, w, labels, g_lp, g_ent, buf, lse, ez = _bwd_setup(chunk)
    G = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(n, hid, device="cuda")
    gw = torch.empty_like(w)
    starts = list(range(0, v, chunk))
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()

    def chunked(recompute: bool, ours_kernel: bool, grads: bool):
        for c0 in starts:
            wc = w[c0:c0 + chunk]
            g = buf[:, :wc.shape[0]]
            if ours_kernel:
                lt.grad_logits(h, wc, g, lse, ez, g_lp, g_ent, labels, lse, c0, 1.0)
            if recompute:
                torch.mm(h, wc.t(), out=g)
            if grads:
                lp_mod._addmm_fp32(acc, g, wc)
                torch.mm(g.t(), h, out=gw[c0:c0 + wc.shape[0]])

    def ours_fwd():
        with torch.no_grad():
            return fused_logprob_entropy(h, w, labels)
    gh16 = torch.empty(n, hid, device="cuda", dtype=torch.bfloat16)

    def one_grad(kind):  # each grad GEMM alone over the chunks: fp32 accumulate, plain bf16, weight
        for c0 in starts:
            wc = w[c0:c0 + chunk]
            g = buf[:, :wc.shape[0]]
            if kind == "h_fp32_acc":
                lp_mod._addmm_fp32(acc, g, wc)
            elif kind == "h_bf16":
                torch.mm(g, wc, out=gh16)
            else:
                torch.mm(g.t(), h, out=gw[c0:c0 + wc.shape[0]])
    pieces = {"three_gemms": lambda: (h @ w.t(), G @ w, G.t() @ h), "fwd_gemm": lambda: h @ w.t(),
              "grad_input_unchunked": lambda: G @ w, "grad_weight_unchunked": lambda: G.t() @ h,
              "grad_h_chunked_fp32_acc": lambda: one_grad("h_fp32_acc"),
              "grad_h_chunked_bf16_no_acc": lambda: one_grad("h_bf16"),
              "grad_w_chunked": lambda: one_grad("w"),
              "two_grad_gemms_unchunked": lambda: (G @ w, G.t() @ h),
              "ours_fwd_bwd": lambda: _fwd_bwd(hg, wg, labels, g_lp, g_ent), "ours_fwd": ours_fwd,
              "ours_bwd_kernels": lambda: chunked(False, True, False),
              "grad_gemms_chunked": lambda: chunked(False, False, True),
              "cublas_chunked_bwd": lambda: chunked(True, False, True)}
    out = {"gpu": torch.cuda.get_device_name(), "N": n, "H": hid, "chunk": chunk}
    for rep in range(reps):
        for name, fn in pieces.items():
            out[f"{name}_ms_{rep}"] = _loop_ms(fn, calls=10)
    return out


def gaps() -> dict:
    """Host time to issue one forward + backward, and the GPU's idle gaps over three calls (profiler)."""
    h, w, labels, g_lp, g_ent = _inputs(*SHAPE)
    h.requires_grad_()
    w.requires_grad_()
    run = lambda: _fwd_bwd(h, w, labels, g_lp, g_ent)  # noqa: E731
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    out = {"host_issue_ms": (time.perf_counter() - t0) * 1e3}
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    kern = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)
    idle = [(b.time_range.start - a.time_range.end, i, a.name[:40], b.name[:40])
            for i, (a, b) in enumerate(zip(kern, kern[1:]))]
    out.update(kernels=len(kern), busy_ms=sum(e.time_range.end - e.time_range.start for e in kern) / 1e3,
               span_ms=(kern[-1].time_range.end - kern[0].time_range.start) / 1e3,
               idle_after_first_call_ms=sum(g for g, i, _, _ in idle if i >= len(kern) // 3) / 1e3,
               largest_gaps_us=[(round(g, 1), i, x, y) for g, i, x, y in sorted(idle, reverse=True)[:12]],
               ours_kernel_ms_per_call=_kernel_totals(kern, 3))
    hb, wb = h.detach(), w.detach()
    G = torch.randn(hb.shape[0], wb.shape[0], device="cuda", dtype=hb.dtype)
    baseline = lambda: (hb @ wb.t(), G @ wb, G.t() @ hb)  # noqa: E731
    baseline()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            baseline()
        torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    out["three_gemms_kernel_ms_per_call"] = _kernel_totals(kern, 3)
    return out


def _kernel_totals(kern, calls: int) -> dict:
    """GPU milliseconds per call by kernel name (first 60 characters), largest first, and their sum."""
    tot = {}
    for e in kern:
        tot[e.name[:60]] = tot.get(e.name[:60], 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / calls
    out = {k: round(v, 4) for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}
    out["sum"] = round(sum(tot.values()), 3)
    return out


def host_overhead(reps=50) -> dict:
    """Host microseconds to issue each piece (the GPU work is queued, not waited for)."""
    n, hid, v = SHAPE
    h, w, labels, g_lp, _ = _inputs(n, hid, v)
    spec = lp_mod._make_spec(h, w, labels, None, None, None, 1.0, True, None, "auto")
    lse, ez = torch.rand(n, device="cuda"), torch.rand(n, device="cuda")
    chunk = 8448
    buf = torch.empty(n, chunk, device="cuda", dtype=torch.bfloat16)
    wc = w[:chunk]
    acc = torch.zeros(n, hid, device="cuda")
    hs, ls = h[:64].clone(), labels[:64].clone()  # a small problem: the host cost of a whole forward
    pieces = {"label_check": lambda: lp_mod._LabelRangeCheck(labels, v).raise_if_bad(),
              "torch_path_local_columns": lambda: lp_mod._local_columns(labels, spec),
              "grad_logits_launch": lambda: lt.grad_logits(h, wc, buf, lse, ez, g_lp, g_lp, labels, lse, 0, 1.0),
              "addmm_fp32_launch": lambda: lp_mod._addmm_fp32(acc, buf, wc),
              "mm_launch": lambda: torch.mm(buf.t(), h),
              "small_forward_no_grad": lambda: fused_logprob_entropy(hs, w, ls)}
    out = {}
    for name, fn in pieces.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name + "_us"] = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
    out["small_forward_profile"] = _host_profile(pieces["small_forward_no_grad"], reps)
    return out


def _host_profile(fn, reps: int, top: int = 18) -> list:
    """cProfile of `reps` calls: the functions with the most own time, as 'µs per call  name'."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:top]  # (file, line, name) -> stats
    return [f"{st[2] / reps * 1e6:8.1f} own / {st[3] / reps * 1e6:8.1f} cum us  {os.path.basename(k[0])}:{k[1]} {k[2]}"
            for k, st in rows]


def profile_once(chunk=8192):
    """One launch of FWD_CONFIGS[0] and BWD_CONFIGS[0] (e.g. under `ncu -k regex:_variant`)."""
    n, hid, v = SHAPE
    h, w, labels, g_lp, _ = _inputs(n, hid, v)
    buf = torch.empty(n, chunk, device="cuda", dtype=torch.bfloat16)
    _, _, lse, ez = run_fwd(FWD_CONFIGS[0], h, w, 1.0)
    run_bwd(BWD_CONFIGS[0], h, w[:chunk], buf, lse, ez, g_lp, g_lp, 1.0)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ab_modes = {"epilogue": epilogue_ab, "group": group_ab, "overlap": overlap_ab, "stages": stages_ab,
                "chunks": chunks_ab, "keep": keep_ab, "decompose": decompose, "gaps": gaps, "host": host_overhead}
    modes = (*ab_modes, "profile", "interpret_check")
    for mode in modes:
        ap.add_argument("--" + mode.replace("_", "-"), action="store_true")
    ap.add_argument("--chunk", type=int, default=8192, help="backward chunk width of the default sweep")
    ap.add_argument("--only", choices=["fwd", "bwd"], default=None, help="default sweep: one direction")
    args = ap.parse_args()
    if args.interpret_check:
        return interpret_check()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/logprob_sweep.py needs a CUDA GPU (except --interpret-check)")
    triton.set_allocator(_alloc)
    if args.profile:
        return profile_once()
    for mode, fn in ab_modes.items():
        if getattr(args, mode):
            return _write(f"logprob_{mode}.json", {"gpu": torch.cuda.get_device_name(), **fn()})
    report = sweep(args.chunk, args.only)
    _write("logprob_sweep.json", report)
    for kind in ("fwd", "bwd"):
        for row in sorted(report[kind], key=lambda r: r.get("ms", 1e9)):
            print(kind, row["cfg"], row["epilogue"], f"{row['ms']:.3f} ms" if "ms" in row else row.get("error"))


if __name__ == "__main__":
    main()
