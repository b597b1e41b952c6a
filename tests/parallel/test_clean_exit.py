"""A finished distributed run exits 0: `torchrun --nproc-per-node 2 -m verl_mega generate --tp 2` (gloo) a few
times through scripts/exit_check.sh (a gloo group alive at interpreter exit used to abort such runs with
SIGABRT now and then); its log carries no CUDA_DEVICE_MAX_CONNECTIONS advice on CPU; `shutdown_distributed`
is idempotent; `verl-mega` without a command is a usage error (exit 2), `--help` is not."""

import os
import subprocess

import torch.distributed as dist

from verl_mega.apps.cli import main
from verl_mega.parallel.dist import init_distributed, shutdown_distributed

from tests.run_python import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_generate_tp2_under_torchrun_exits_zero(tmp_path):
    env = child_env()
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "exit_check.sh"), "2", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 of 2 runs failed" in proc.stdout
    log = (tmp_path / "run.log").read_text()
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in log, log  # moot without CUDA: silenced on CPU


def test_shutdown_is_idempotent():
    init_distributed()  # a world of one in this process
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # nothing left: no error


def test_cli_without_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: verl-mega" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "usage: verl-mega" in capsys.readouterr().out
