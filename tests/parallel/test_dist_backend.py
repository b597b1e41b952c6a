"""`init_distributed` picks its backend from the argument, $VERL_MEGA_DIST_BACKEND, then the machine, and refuses
an nccl rank without a GPU of its own with an error naming LOCAL_RANK (was CUDA's "invalid device ordinal" when
two ranks started on a one-GPU machine). Each case runs in a fresh interpreter: no process group yet."""

import subprocess
import sys

from tests.run_python import child_env

INIT = "from verl_mega.parallel.dist import init_distributed; init_distributed({arg})"


def run_init(arg: str, **env: str) -> subprocess.CompletedProcess:
    variables = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **env}
    return subprocess.run([sys.executable, "-c", INIT.format(arg=arg)], env=child_env(**variables),
                          capture_output=True, text=True, timeout=120)


def test_unknown_backend_is_named():
    out = run_init("", VERL_MEGA_DIST_BACKEND="mpi")
    assert out.returncode != 0 and "VERL_MEGA_DIST_BACKEND" in out.stderr and "'mpi'" in out.stderr, out.stderr[-2000:]


def test_nccl_rank_without_its_own_gpu_is_named():
    import torch

    local_rank = torch.cuda.device_count()  # one past the last GPU (0 on a CPU machine)
    out = run_init("backend='nccl'", LOCAL_RANK=str(local_rank))
    assert out.returncode != 0, out.stdout
    assert f"LOCAL_RANK={local_rank}" in out.stderr and "VERL_MEGA_DIST_BACKEND=gloo" in out.stderr, out.stderr[-2000:]
