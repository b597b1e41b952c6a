"""The benchmarks the GPU runs use (`benchmarks/run_h200.sh`), run end to end on CPU in their `--smoke`
mode as subprocesses (as a user runs them): they finish, write their JSON, and its figures are finite; and the
CPU-only engine_host.py on a small workload.

Also checks the forced response lengths reach the engine: the continuous-batching engine's generated
tokens equal the sum of the drawn lengths (every row stopped at its forced EOS), and throughput.py's
mean response length lies in its smoke range [2, 8].
"""

import json
import math
import os
import subprocess
import sys
import types

import pytest

from tests.run_python import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str, out_dir, nproc: int = 0) -> None:
    """`--smoke` run of benchmarks/<script> as a subprocess; nproc > 0: under torchrun with that many gloo ranks."""
    env = child_env(OUT=str(out_dir))
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                 if nproc else [])
    proc = subprocess.run([*launch, os.path.join(ROOT, "benchmarks", script), "--smoke", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.timeout(300)
def test_throughput_smoke(tmp_path):
    # packed micro-batches with the trainer's `auto` token budgets (the sequence-count path: test_scaling_smoke)
    run_benchmark("throughput.py", "--micro-batch", "tokens-auto", "--out", str(tmp_path), out_dir=tmp_path)
    report = json.loads((tmp_path / "throughput.json").read_text())
    (result,) = report["results"]
    # no device capacity on CPU: the trainer's fallback, micro_batch_size (4 rows) whole sequences of 16 + 8 tokens
    assert result["micro_batch"] == "96 / 96 tokens" and finite(result["plan_peak_gib"]), result
    for key in ("step_s", "tokens_per_step", "tokens_per_s_per_gpu", "gen_tokens_per_s_per_gpu",
                "model_tflops_per_step", "peak_memory_gib"):
        assert finite(result[key]) and result[key] > 0, (key, result[key])
    assert all(finite(v) and v >= 0 for v in result["phase_s"].values()), result["phase_s"]
    assert 2 <= result["mean_response_len"] <= 8  # EOS forced at lengths in the smoke range 2:8
    assert (tmp_path / "throughput.md").exists() and (tmp_path / "throughput.png").exists()


@pytest.mark.timeout(300)
def test_rollout_service_smoke(tmp_path):
    # variants: the CPU default (gather + torch sampler) and the CUDA kernels (the paged attention and the one-pass
    # sampler, in the interpreter) through the window path; the per-step fused path is tests/rollout's
    run_benchmark("rollout_service.py", "--out-dir", str(tmp_path), "--variants", "new,new_paged_fused_window",
                  out_dir=tmp_path)
    report = json.loads((tmp_path / "rollout_service.json").read_text())
    assert report["greedy_parity_tiny_fp32"]["equal"] is True
    tiny = report["tiny"]
    for name in ("new", "static"):
        assert finite(tiny[name]["tokens_per_s"]) and tiny[name]["tokens_per_s"] > 0
    assert tiny["new"]["tokens"] == tiny["static"]["tokens"]  # = the sum of the forced lengths
    assert tiny["new"]["tokens"] == round(tiny["mean_length"] * tiny["rows"])
    assert finite(tiny["ratio_new_over_static"]) and finite(tiny["new"]["bound_spec"]["fraction_of_bound"])
    roofline = tiny["new"]["roofline_spec"]  # its per-step rows re-derived from the lengths = the engine's counter
    assert roofline["rows_match"] and roofline["bound_seconds"] >= tiny["new"]["bound_spec"]["bound_seconds"]
    window = tiny["new_paged_fused_window"]
    assert window["tokens"] == tiny["new"]["tokens"], window  # Triton kernels in the interpreter, window path
    assert (window["attention"], window["sampler"]) == ("paged", "fused"), window
    grpo = report["grpo_step"]
    assert finite(grpo["hidden_fraction"])
    for mode in ("after_generation", "streaming"):
        assert finite(grpo[mode]["time/reward"]) and finite(grpo[mode]["step_seconds"])


@pytest.mark.timeout(300)
def test_engine_host_runs(tmp_path):
    """benchmarks/engine_host.py (CPU only, no --smoke mode: a small workload instead): every row's forced length
    decoded, host time per window reported."""
    out = tmp_path / "engine_host.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "engine_host.py"), "--prompts", "4", "--n",
                           "2", "--max-len", "40", "--repeats", "1", "--out", str(out)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["tokens"] == run["forced_tokens"], run  # each row decoded to its forced EOS, no further
    assert finite(run["host_ms_per_window"]) and run["host_ms_per_window"] > 0, run


@pytest.mark.timeout(300)
def test_layout_parity_smoke(tmp_path):
    """Issue 20's first-step loss check on 2 gloo ranks: every layout's loss within the stated tolerance of the
    world-size-1 reference, in fp32 and bf16 (the bf16 tolerance derived from the reference's bf16 - fp32 gap)."""
    run_benchmark("layout_parity.py", "--dtypes", "bfloat16,float32", "--out", str(tmp_path / "ref"), out_dir=tmp_path)
    run_benchmark("layout_parity.py", "--dtypes", "bfloat16,float32", "--layouts", "1x1,2x1,1x2", "--reference",
                  str(tmp_path / "ref" / "layout_parity.json"), "--out", str(tmp_path), out_dir=tmp_path, nproc=2)
    report = json.loads((tmp_path / "layout_parity.json").read_text())
    assert [r["layout"] for r in report["results"]] == ["1x1x2"] * 2 + ["2x1x1"] * 2 + ["1x2x1"] * 2
    assert all(r["verdict"] == "pass" and finite(r["loss"]) for r in report["results"]), report["results"]
    tol = report["judgement"]["tolerance_bf16"]
    assert 0 < tol < 0.01 * report["judgement"]["reference_losses"]["bfloat16"]


@pytest.mark.timeout(300)
def test_scaling_smoke(tmp_path):
    """benchmarks/scaling.py over throughput.py reports at 1 and 2 (gloo) ranks: one row per GPU count, the
    1-rank run the baseline; reports of different devices are refused."""
    run_benchmark("throughput.py", "--out", str(tmp_path / "1"), out_dir=tmp_path)
    run_benchmark("throughput.py", "--out", str(tmp_path / "2"), out_dir=tmp_path, nproc=2)
    reports = [str(tmp_path / n / "throughput.json") for n in ("1", "2")]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scaling.py"), *reports, "--out",
                           str(tmp_path)], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [(r["gpus"], r["baseline_gpus"]) for r in rows] == [(1, 1), (2, 1)]
    assert rows[0]["efficiency"] == 1.0 and finite(rows[1]["efficiency"]) and rows[1]["efficiency"] > 0
    assert (tmp_path / "scaling.png").exists()
    other = json.loads(open(reports[1]).read())
    other["device"] = "another card"
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scaling.py"), reports[0],
                           str(tmp_path / "other.json"), "--out", str(tmp_path)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "scale one machine kind at a time" in proc.stderr


@pytest.mark.timeout(300)
def test_reshard_benchmark_layouts(tmp_path):
    """benchmarks/reshard.py on 4 gloo ranks with dp > 1 (tp 2 = 2 replicas): the regathered weights are checked
    against every training shard inside the script; a tp that does not divide the KV heads is listed as skipped."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           os.path.join(ROOT, "benchmarks", "reshard.py"), "--device", "cpu", "--tiny", "--tps", "2,4", "--pps", "2",
           "--reps", "1", "--warmup", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = json.loads((tmp_path / "reshard.json").read_text())["results"]
    assert [r["transition"].split(" ")[0] for r in results] == ["tp=2,pp=1", "tp=4,pp=1", "tp=1,pp=2"]
    assert results[0]["verified"] and results[2]["verified"] and "num_kv_heads" in results[1]["skipped"]
    assert all(finite(r["ratio_hybrid_over_allgather"]) for r in (results[0], results[2]))


@pytest.mark.timeout(300)
def test_grpo_e2e_smoke(tmp_path):
    # packed micro-batches, forced lengths and --recapture (the engine's graphs freed after every rollout: the
    # baseline of run_h200.sh graph_reuse; on CPU there are no graphs, so nothing is captured)
    run_benchmark("grpo_e2e.py", "--device", "cpu", "--packing", "on", "--response-len", "2:8", "--max-tokens", "64",
                  "--recapture", "--out", str(tmp_path), out_dir=tmp_path)
    (result,) = json.loads((tmp_path / "grpo_e2e.json").read_text())["results"]
    for key in ("time/generate", "time/logprob", "time/update", "time/step", "throughput/tokens_per_s_per_gpu"):
        assert finite(result[key]) and result[key] > 0, (key, result[key])
    assert result["time/graph_capture"] == 0 and result["packing"] is True
    assert 2 <= result["response_length/mean"] <= 8


@pytest.mark.timeout(600)
def test_grpo_e2e_ab_variants_measure_the_same_steps(tmp_path):
    # a compiled variant runs one more warm-up step; every variant of an A/B does too, so that their measured steps
    # draw the same prompts and forced response lengths (per-step seeds): equal lengths, equal update FLOPs
    run_benchmark("grpo_e2e.py", "--device", "cpu", "--smoke", "--ab", "tiny", "--variants",
                  "padded,padded@16,packed+compile", "--response-len", "2:8", "--max-tokens", "40",
                  "--logprob-max-tokens", "80", "--out", str(tmp_path), out_dir=tmp_path)
    padded, aligned, packed = json.loads((tmp_path / "grpo_e2e_ab.json").read_text())["results"]
    # padded@16: the same steps with each batch's width padded to a multiple of 16 (trainer.pad_to_multiple_of)
    assert aligned["pad_to_multiple_of"] == 16 and padded["pad_to_multiple_of"] == 1
    assert all(s["batch_width"] % 16 == 0 for s in aligned["per_step"])
    assert aligned["update_flops"] == padded["update_flops"]
    assert f"; tiny @16 {'/'.join(str(s['batch_width']) for s in aligned['per_step'])}." in \
        (tmp_path / "grpo_e2e_ab.md").read_text()
    assert padded["warmup_steps"] == packed["warmup_steps"] == 2
    # the forward-only passes at their own size: 80 tokens packed, 80 // max_new_tokens (8) sequences padded
    assert packed["logprob_max_tokens_per_micro_batch"] == 80 and padded["logprob_micro_batch_size"] == 10
    assert padded["response_length/mean"] == packed["response_length/mean"]
    assert padded["update_flops"] == packed["update_flops"]
    # per measured step: its wall time, and in the table the spread of the packed / padded ratio over the steps
    assert len(packed["per_step"]) == len(padded["per_step"]) and all(finite(s["step"]) for s in packed["per_step"])
    # and the garbage collector's pauses in it (a full collection is step-time spread that is not the GPU)
    assert all(finite(s["gc"]) and 0 <= s["gc"] < s["step"] and s["gc_full_collections"] >= 0
               for s in packed["per_step"] + padded["per_step"])
    # each step's update TFLOP/s (equal FLOPs, so it orders the steps as their update times do); no GPU clocks on CPU
    assert all(finite(s["update_tflops"]) and s["update_tflops"] > 0 and s["gpu_clocks"] is None
               for s in packed["per_step"] + padded["per_step"])
    # and the host's side: the main thread's CPU time within the step's wall time, a host-speed probe
    assert all(0 < s["host"]["thread_cpu_s"] <= s["host"]["wall_s"] * 1.01 and s["host"]["probe_s"] > 0
               and s["host"]["involuntary_switches"] >= 0 and s["host"]["threads"] >= 1
               for s in packed["per_step"] + padded["per_step"])
    # the padded width of each measured step, the same for both variants (the same steps), and in the table
    widths = [s["batch_width"] for s in padded["per_step"]]
    assert widths == [s["batch_width"] for s in packed["per_step"]] and all(w > 0 for w in widths)
    assert f": tiny {'/'.join(map(str, widths))};" in (tmp_path / "grpo_e2e_ab.md").read_text()
    # and the graphs torch.compile compiled in each measured step (none once warm: the extra warm-up step's purpose)
    assert [s["compiled_graphs"] for s in packed["per_step"] + padded["per_step"]] == [0] * (2 * len(packed["per_step"]))
    ratios = [a["step"] / b["step"] for a, b in zip(padded["per_step"], packed["per_step"])]
    row = next(line for line in (tmp_path / "grpo_e2e_ab.md").read_text().splitlines() if "packed+compile" in line)
    assert f"| {min(ratios):.2f}-{max(ratios):.2f}x |" in row, row
    # the memory plan's peak beside the measured ones (on CUDA with its error against the run's peak; CPU has none)
    assert f" | {packed['plan_peak_gib']:.1f} | " in row and packed["plan_peak_gib"] > 0, row


def test_grpo_e2e_auto_token_budget():
    # --max-tokens auto: the largest budget whose memory plans (packed, and padded at budget // max_new_tokens
    # sequences) fit the trainer's share for `auto` budgets of the device; more memory never gives a smaller budget
    from benchmarks import grpo_e2e
    from verl_mega.trainer.memory_plan import AUTO_TOKEN_BUDGETS

    args = grpo_e2e.parse_args(["--device", "cpu", "--max-tokens", "auto", "--max-new-tokens", "1024",
                                "--prompt-len", "128", "--prompts", "64", "--n", "8"])
    variants = [grpo_e2e.VARIANTS["padded"], grpo_e2e.VARIANTS["packed+compile"]]
    layout = types.SimpleNamespace(tp=1, pp=1, dp=1, rank=0)
    picks = []
    for gib in (20, 80, 140, 400):
        args.memory_gib = gib
        picks.append(grpo_e2e.auto_token_budget(args, grpo_e2e.SHAPES["0.5b"], variants, layout))
    candidates = grpo_e2e.budget_candidates(args)  # the trainer's auto candidates, not below one whole sequence
    assert candidates == [s for s in AUTO_TOKEN_BUDGETS if s >= 128 + 1024], candidates
    assert picks == sorted(picks) and set(picks) <= set(candidates), picks
    assert picks[0] < picks[-1] == candidates[0], picks
    assert grpo_e2e.padded_micro_batch(args, 16384) == 16
    # --logprob-max-tokens auto: never below the training budget, and as large as the plans allow
    sizes = []
    for gib, budget in zip((20, 80, 140, 400), picks):
        args.memory_gib = gib
        sizes.append(grpo_e2e.auto_logprob_budget(args, grpo_e2e.SHAPES["0.5b"], variants, layout, budget))
    assert all(size >= budget for size, budget in zip(sizes, picks)) and sizes == sorted(sizes), (sizes, picks)
    assert sizes[-1] == candidates[0], sizes
    # an A/B's budgets: shared = what every variant's plan fits (the padded one limits it), own = each its largest
    args.memory_gib, names = 80, ["padded", "packed+compile"]
    shared = [grpo_e2e.ab_budgets(args, grpo_e2e.SHAPES["0.5b"], names, name)[0] for name in names]
    args.ab_budget = "own"
    own = [grpo_e2e.ab_budgets(args, grpo_e2e.SHAPES["0.5b"], names, name)[0] for name in names]
    assert shared == [picks[1]] * 2 and own[0] == picks[1] < own[1], (shared, own)


@pytest.mark.timeout(300)
def test_padded_width_smoke(tmp_path):
    # forward + backward of a padded micro-batch per width, SDPA backend and attention-bias build (the decoder's
    # aligned one and a plain one, swapped in for the run and put back): a time for each, or the error of a backend
    # that cannot run the call (the memory-efficient kernel has no CPU implementation), and the table
    run_benchmark("padded_width.py", "--out", str(tmp_path), out_dir=tmp_path)
    report = json.loads((tmp_path / "padded_width.json").read_text())
    assert [(r["width"], r["backend"], r["bias"]) for r in report["results"]] == [
        (w, backend, bias) for w in (37, 40) for backend in ("default", "efficient") for bias in ("aligned", "plain")]
    for r in report["results"]:
        assert (finite(r["ms"]) and r["ms"] > 0 and r["error"] is None) if r["backend"] == "default" else \
            (r["ms"] is None and "backend" in r["error"]), r  # --smoke runs on the CPU
        assert r["bias_builds"] >= 1, r  # the decoder built its bias with the function swapped in
    assert (tmp_path / "padded_width.md").read_text().count("| 37 | 5 |") == 4
