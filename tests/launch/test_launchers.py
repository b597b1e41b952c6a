"""The launch scripts against the real launchers: two torchrun agents (`--nnodes 2`, c10d rendezvous on
127.0.0.1) and a real SLURM cluster on this host (munged + slurmctld + two slurmd, see local_slurm.py), each
running `verl-mega train` for 2 steps on a tiny model (2 ranks, gloo); and a rank killed mid-run, which must end
the whole job non-zero, naming the rank, within the collective timeout.

A launcher missing on a dev machine skips its tests with the reason; under CI (CI=true) it fails them, so CI
really runs them (.ci/system_deps.sh installs slurm-wlm and munge).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from local_slurm import TOOLS as SLURM_TOOLS
from local_slurm import LocalSlurm
from verl_mega.testing.multiprocess import free_port
from verl_mega.testing.tiny_hf import make_tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN_SH = os.path.join(REPO, "launch", "torchrun.sh")
SLURM_SBATCH = os.path.join(REPO, "launch", "slurm.sbatch")
PROMPTS_PER_RANK, N_SAMPLES = 2, 2
TRAIN_ARGS = [f"trainer.rollout_batch_size={PROMPTS_PER_RANK}", f"rollout.n_samples={N_SAMPLES}",
              "rollout.max_new_tokens=4", "trainer.save_final=false", "trainer.progress_bar=false"]
# VERL_MEGA_DIST_TIMEOUT also bounds start-up (init_process_group waits for every rank), and with other jobs on
# the 2 cores the ranks' imports finished > 20 s apart here: 120 s for the runs, 45 s for the hung-rank test.
# A killed rank's sockets close at once, so its peers fail at their next collective (1-16 s measured); the
# launchers promise "within the collective timeout", which the kill tests assert.
DIST_TIMEOUT_S = 120
HUNG_DIST_TIMEOUT_S = 45
TEARDOWN_S = 15  # after a collective timed out: the rank's exit, torchrun's and srun's teardown (~2-10 s measured)
RUN_TIMEOUT_S = 240  # a 2-step run took 25-45 s here, 2 cores shared with other jobs (mostly imports)


def require(*tools: str) -> None:
    """Skip (dev machine) or fail (CI=true) when a tool the test drives is not installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"not installed: {', '.join(missing)} (CI installs them with .ci/system_deps.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny HF model, an 8-row GSM8K-style jsonl (every prompt the same token length) and a config."""
    root = tmp_path_factory.mktemp("launch")
    model = make_tiny_hf_model(str(root / "model"), hidden_size=32, num_layers=2)
    with open(root / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1=?"}], "data_source": "gsm8k",
                                "reward_model": {"ground_truth": str(i + 1)}}) + "\n")
    (root / "cfg.yaml").write_text(f"model:\n  path: {model}\ndata:\n  train_path: {root / 'train.jsonl'}\n")
    return root


def launch_env(**extra) -> dict:
    """The environment for launched ranks: this checkout first on PYTHONPATH, one thread per rank, the
    collective timeout DIST_TIMEOUT_S (unless given)."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "VERL_MEGA_DIST_TIMEOUT": str(DIST_TIMEOUT_S), **{k: str(v) for k, v in extra.items()}}


def prompt_tokens_per_step(workdir, world: int) -> int:
    """Prompt tokens of one global step: world x prompts per rank x samples x the (fixed) chat-prompt length."""
    from transformers import AutoTokenizer

    from verl_mega.rollout.frontend import encode_prompts

    tok = AutoTokenizer.from_pretrained(str(workdir / "model"))
    (ids,) = encode_prompts(tok, [[{"role": "user", "content": "0+1=?"}]])
    return world * PROMPTS_PER_RANK * N_SAMPLES * len(ids)


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def find_worker(run_id: str, rank: int, timeout_s: float, **env: str) -> int:
    """pid of the torchrun worker with RANK=rank in rendezvous `run_id` (TORCHELASTIC_RUN_ID in its environment)
    and the given further environment values."""
    want = {f"{k}={v}".encode() for k, v in {"TORCHELASTIC_RUN_ID": run_id, "RANK": rank, **env}.items()}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if want <= set(f.read().split(b"\0")):
                        return int(pid)
            except OSError:
                continue
        time.sleep(0.2)
    raise TimeoutError(f"no worker with RANK={rank} in run {run_id} after {timeout_s}s")


def wait_for_metrics(out_dir, alive, timeout_s: float) -> None:
    """Wait until rank 0 has logged a step (training is under way); fail early if the job ended first."""
    path = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout_s
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert alive(), "the job ended before its first step"
        assert time.monotonic() < deadline, f"no step logged after {timeout_s}s"
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------- torchrun
def start_agents(workdir, out_dir, run_id: str, steps: int) -> list[subprocess.Popen]:
    """Two torchrun agents (NODE_RANK 0 and 1, one process each) of one c10d rendezvous on 127.0.0.1."""
    env = launch_env(NNODES=2, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), RDZV_ID=run_id)
    cmd = ["bash", TORCHRUN_SH, "train", str(workdir / "cfg.yaml"), f"trainer.total_steps={steps}",
           f"trainer.output_dir={out_dir}", *TRAIN_ARGS]
    return [subprocess.Popen(cmd, env={**env, "NODE_RANK": str(node)}, cwd=str(workdir), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True) for node in (0, 1)]


def finish(agents: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, str]]:
    """(exit code, output) of each agent; kills their process groups if they outlive timeout_s."""
    results = []
    for agent in agents:
        try:
            out, _ = agent.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for a in agents:
                os.killpg(a.pid, signal.SIGKILL)
            raise
        results.append((agent.returncode, out))
    return results


def test_dry_runs_print_resolved_commands(workdir):
    env = launch_env(NNODES=2, NODE_RANK=1, NPROC_PER_NODE=4, MASTER_ADDR="10.0.0.1", MASTER_PORT=1234, RDZV_ID="j7")
    out = subprocess.run(["bash", TORCHRUN_SH, "--dry-run", "train", "cfg.yaml", "optim.lr=1e-6"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert ("--nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:1234 --rdzv-id j7 "
            "--rdzv-conf is_host=0 --max-restarts 0 -m verl_mega train cfg.yaml optim.lr=1e-6") in out
    env = launch_env(SLURM_JOB_NODELIST="localhost", SLURM_NNODES=1, SLURM_JOB_ID=42, NPROC_PER_NODE=2)
    out = subprocess.run(["bash", SLURM_SBATCH, "--dry-run", "train", "cfg.yaml"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --label bash -c" in out
    assert "NNODES=1 NPROC_PER_NODE=2 RDZV_ID=42" in out
    assert "node 0: NODE_RANK=0" in out and "--rdzv-id 42 --rdzv-conf is_host=1" in out


def test_torchrun_two_nodes_train(workdir, tmp_path):
    agents = start_agents(workdir, tmp_path / "run", f"two-{uuid.uuid4().hex[:8]}", steps=2)
    (rc0, out0), (rc1, out1) = finish(agents, RUN_TIMEOUT_S)
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + "\n---\n" + out1[-3000:]
    assert "done: 2 steps" in out0 + out1  # printed by global rank 0 (either node, as the rendezvous orders them)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    # prompt tokens are summed over data-parallel ranks: 2 here proves both nodes trained in one world
    assert metrics[0]["prompt_length/tokens"] == prompt_tokens_per_step(workdir, world=2)


def test_torchrun_dead_rank_ends_job(workdir, tmp_path):
    run_id = f"dead-{uuid.uuid4().hex[:8]}"
    agents = start_agents(workdir, tmp_path / "run", run_id, steps=10_000)
    try:
        wait_for_metrics(tmp_path / "run", lambda: all(a.poll() is None for a in agents), RUN_TIMEOUT_S)
        victim = find_worker(run_id, rank=1, timeout_s=10)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        results = finish(agents, DIST_TIMEOUT_S)
        elapsed = time.monotonic() - killed_at
        print(f"both agents exited {elapsed:.1f} s after the kill")
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    assert all(rc != 0 for rc, _ in results), [rc for rc, _ in results]
    assert elapsed < DIST_TIMEOUT_S
    out = "\n".join(o for _, o in results)
    assert "rank      : 1 (local_rank: 0)" in out and "Signal 9 (SIGKILL) received" in out, out[-3000:]


# ----------------------------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A 2-node SLURM cluster on this host (both nodes 127.0.0.1), shut down after the module."""
    require(*SLURM_TOOLS)
    if os.geteuid() != 0:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("the local SLURM cluster needs root")
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")), nodes=2)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def submit_train(slurm, workdir, out_dir, steps: int, dist_timeout_s: int = DIST_TIMEOUT_S) -> int:
    """sbatch launch/slurm.sbatch on 2 nodes (one torchrun each, one process per node) from workdir."""
    env = launch_env(NPROC_PER_NODE=1, MASTER_PORT=free_port(), VERL_MEGA_HOME=REPO,
                     VERL_MEGA_DIST_TIMEOUT=dist_timeout_s)
    return slurm.submit(["--nodes", "2", SLURM_SBATCH, "train", str(workdir / "cfg.yaml"),
                         f"trainer.total_steps={steps}", f"trainer.output_dir={out_dir}", *TRAIN_ARGS],
                        cwd=str(workdir), env=env)


def job_log(workdir, job_id: int) -> str:
    with open(workdir / f"verl-mega-{job_id}.out", errors="replace") as f:
        return f.read()


def test_slurm_dry_run_in_allocation(slurm, workdir):
    env = launch_env(NPROC_PER_NODE=1, MASTER_PORT=1234, VERL_MEGA_HOME=REPO)
    job_id = slurm.submit(["--nodes", "2", SLURM_SBATCH, "--dry-run", "train", "cfg.yaml"], cwd=str(workdir), env=env)
    info = slurm.wait(job_id, 60)
    log = job_log(workdir, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    # the rendezvous host is the first node's NodeAddr (n1 -> 127.0.0.1), the rendezvous id the job id
    assert f"MASTER_ADDR=127.0.0.1 MASTER_PORT=1234 NNODES=2 NPROC_PER_NODE=1 RDZV_ID={job_id}" in log
    for node in (0, 1):
        assert (f"node {node}: NODE_RANK={node} VERL_MEGA_DIST_TIMEOUT={DIST_TIMEOUT_S} python3 -m torch.distributed.run "
                f"--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:1234 --rdzv-id {job_id} "
                f"--rdzv-conf is_host={int(node == 0)} --max-restarts 0 -m verl_mega train cfg.yaml") in log, log


def test_slurm_two_nodes_train(slurm, workdir, tmp_path):
    job_id = submit_train(slurm, workdir, tmp_path / "run", steps=2)
    info = slurm.wait(job_id, RUN_TIMEOUT_S)
    log = job_log(workdir, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:] + slurm.logs()
    assert info["NumNodes"] == "2"
    assert "done: 2 steps" in log
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["prompt_length/tokens"] == prompt_tokens_per_step(workdir, world=2)
    for node in (0, 1):  # per-node logs of this job, each starting with the node's launch line
        with open(workdir / "logs" / f"verl-mega-{job_id}" / f"node{node}.log") as f:
            assert f.readline().startswith(f"verl-mega: node {node} of 2, 1 processes: "), node


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_slurm_dead_rank_ends_job(slurm, workdir, tmp_path, sig):
    """A killed rank (sockets close: its peer fails at once) or a hung one (SIGSTOP: its peer's collective times
    out after VERL_MEGA_DIST_TIMEOUT) ends the job FAILED; srun --kill-on-bad-exit stops the other node."""
    timeout_s = DIST_TIMEOUT_S if sig == signal.SIGKILL else HUNG_DIST_TIMEOUT_S
    job_id = submit_train(slurm, workdir, tmp_path / "run", steps=10_000, dist_timeout_s=timeout_s)
    try:
        wait_for_metrics(tmp_path / "run", lambda: slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"),
                         RUN_TIMEOUT_S)
        victim = find_worker(str(job_id), rank=1, timeout_s=10, SLURM_JOB_ID=str(job_id))  # rendezvous id = job id
        signalled_at = time.monotonic()
        os.kill(victim, sig)
        info = slurm.wait(job_id, timeout_s + TEARDOWN_S)
        elapsed = time.monotonic() - signalled_at
        print(f"job {job_id} ended {info['JobState']} {elapsed:.1f} s after {sig.name}")
    finally:
        subprocess.run(["scancel", str(job_id)], env=slurm.env(), timeout=30)
    log = job_log(workdir, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    if sig == signal.SIGKILL:
        assert elapsed < timeout_s
        assert "rank      : 1 (local_rank: 0)" in log and "Signal 9 (SIGKILL) received" in log, log[-3000:]
    else:  # rank 0 waits the full collective timeout, names itself and the timeout; then everything is torn down
        assert timeout_s <= elapsed < timeout_s + TEARDOWN_S
        assert "rank      : 0 (local_rank: 0)" in log and "Timed out waiting" in log, log[-3000:]
