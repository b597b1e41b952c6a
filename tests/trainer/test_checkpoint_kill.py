"""Crash and resume under torchrun (2 gloo ranks, dp=2): rank 1 is SIGKILLed at step 2; the job must
exit non-zero within VERL_MEGA_DIST_TIMEOUT (20 s) of the kill, and a restart resumes from the last
complete checkpoint with the loss and grad norm of an uninterrupted single-process run (rel. 1e-5)."""

import json
import os
import subprocess
import sys
import time

from _engine_cases import build_engine, make_hf_dir, train
from verl_mega.parallel import Layout
from verl_mega.testing.multiprocess import free_port

from tests.run_python import child_env

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_resume_script.py")
TIMEOUT_S = 20


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = child_env(VERL_MEGA_DIST_TIMEOUT=str(TIMEOUT_S))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), SCRIPT, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_kill_one_rank_then_resume(tmp_path):
    hf_dir = make_hf_dir(str(tmp_path / "hf"))
    log = str(tmp_path / "log.jsonl")
    common = ["--hf-dir", hf_dir, "--ckpt", str(tmp_path / "ckpt"), "--steps", "3", "--jsonl", log]

    crashed = _torchrun(common + ["--kill-at", "2"])
    ended = time.time()
    assert crashed.returncode != 0 and os.path.exists(log + ".killed"), crashed.stderr[-5000:]
    killed_at = float(open(log + ".killed").read())
    assert ended - killed_at < TIMEOUT_S, f"job took {ended - killed_at:.1f} s to exit after the kill"
    assert "exitcode" in crashed.stderr and "SIGKILL" in crashed.stderr  # torchrun names the failed rank
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_1", "step_2"]

    resumed = _torchrun(common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in lines] == [0, 1, 2] and lines[2]["start"] == 2

    layout = Layout.create(1, 1, 1)
    ref = train(build_engine(layout, hf_dir), range(3), layout)  # the uninterrupted run, single process
    for r, (loss, norm, _) in zip(lines, ref):
        assert abs(r["loss"] - loss) < 1e-5 * loss and abs(r["grad_norm"] - norm) < 1e-5 * norm
