"""The two benchmarks the GPU runs use (`benchmarks/run_h200.sh`), run end to end on CPU in their `--smoke`
mode as subprocesses (as a user runs them): they finish, write their JSON, and its figures are finite.

Also checks the forced response lengths reach the engine: the continuous-batching engine's generated
tokens equal the sum of the drawn lengths (every row stopped at its forced EOS), and throughput.py's
mean response length lies in its smoke range [2, 8].
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.run_python import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str, out_dir) -> None:
    env = child_env(OUT=str(out_dir))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.timeout(300)
def test_throughput_smoke(tmp_path):
    run_benchmark("throughput.py", "--out", str(tmp_path), out_dir=tmp_path)
    report = json.loads((tmp_path / "throughput.json").read_text())
    (result,) = report["results"]
    for key in ("step_s", "tokens_per_step", "tokens_per_s_per_gpu", "gen_tokens_per_s_per_gpu",
                "model_tflops_per_step", "peak_memory_gib"):
        assert finite(result[key]) and result[key] > 0, (key, result[key])
    assert all(finite(v) and v >= 0 for v in result["phase_s"].values()), result["phase_s"]
    assert 2 <= result["mean_response_len"] <= 8  # EOS forced at lengths in the smoke range 2:8
    assert (tmp_path / "throughput.md").exists() and (tmp_path / "throughput.png").exists()


@pytest.mark.timeout(300)
def test_rollout_service_smoke(tmp_path):
    run_benchmark("rollout_service.py", "--out-dir", str(tmp_path), out_dir=tmp_path)
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
    assert "tokens_per_s" in tiny["new_paged"], tiny["new_paged"]  # the Triton kernel in the interpreter
    assert "tokens_per_s" in tiny["new_paged_fused"], tiny["new_paged_fused"]  # + the one-pass sampler
    assert tiny["new_paged_fused_sync16"]["sync_every"] == 16, tiny["new_paged_fused_sync16"]
    grpo = report["grpo_step"]
    assert finite(grpo["hidden_fraction"])
    for mode in ("after_generation", "streaming"):
        assert finite(grpo[mode]["time/reward"]) and finite(grpo[mode]["step_seconds"])
