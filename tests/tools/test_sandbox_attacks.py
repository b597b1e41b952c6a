"""Acceptance item 2: attacks on the local sandbox, each ending in a structured result within its limit.

Every test runs a hostile program through `Sandbox.run_sync` with the small limits of conftest.SMALL
(2 s wall, 256 MiB, 16 processes, 1 MiB files, 8 MiB /tmp, 64 KiB output) and checks the result's
status / exit code / output, that it came back within the wall limit plus a margin, and that this
(host) process is still running. Margin: 3 s for a loaded 2-core CI machine, covering bwrap start,
interpreter start and teardown (about 0.05 s each on an idle machine).
"""

import os
import platform
import socket
import time
import uuid

import pytest

from tests.tools.helpers import SMALL, assert_no_leftovers
from verl_mega.tools import RunStatus

MARGIN_S = 3.0


def run(sandbox, code: str, stdin: str = ""):
    t0 = time.monotonic()
    result = sandbox.run_sync(code, stdin)
    elapsed = time.monotonic() - t0
    assert elapsed < SMALL.timeout_s + MARGIN_S, f"took {elapsed:.1f}s: {result}"
    assert result.execution_time <= elapsed
    os.kill(os.getpid(), 0)  # the host process is alive (raises otherwise)
    return result


def test_clean_run_and_limits_in_force(sandbox):
    code = (
        "import resource as r, sys\n"
        "print(input()[::-1])\n"
        "for name in ('AS', 'CPU', 'NPROC', 'FSIZE', 'NOFILE', 'CORE'):\n"
        "    print(name, r.getrlimit(getattr(r, 'RLIMIT_' + name))[1])\n"
        "print('err', file=sys.stderr); sys.exit(3)\n"
    )
    result = run(sandbox, code, stdin="abc\n")
    assert (result.status, result.return_code, result.stderr) == (RunStatus.FINISHED, 3, "err\n")
    assert result.stdout.split("\n") == [
        "cba",
        f"AS {256 << 20}",
        f"CPU {SMALL.cpu_s}",
        "NPROC 16",
        f"FSIZE {1 << 20}",
        "NOFILE 64",
        "CORE 0",
        "",
    ]


def test_infinite_loop_is_killed_at_the_wall_limit(sandbox):
    result = run(sandbox, "print('start', flush=True)\nwhile True:\n    pass\n")
    assert (result.status, result.return_code, result.stdout) == (RunStatus.TIME_LIMIT, None, "start\n")
    assert result.execution_time >= SMALL.timeout_s
    assert_no_leftovers()


def test_memory_bomb_fails_inside(sandbox):
    # Map 16 MiB blocks until refused (mmap reserves without touching pages: fast on a loaded machine),
    # then ask for 1 GiB at once: both stop at the 256 MiB address-space limit.
    code = (
        "import mmap\nblocks = []\n"
        "try:\n    while True:\n        blocks.append(mmap.mmap(-1, 16 << 20))\n"
        "except OSError as e:\n    print(len(blocks) * 16, type(e).__name__)\n"
        "x = bytearray(1 << 30)\n"
    )
    result = run(sandbox, code)
    mapped_mb, error = result.stdout.split()
    assert 0 < int(mapped_mb) < 256 and error == "OSError"  # ENOMEM: the interpreter itself holds some of the 256
    assert result.status == RunStatus.FINISHED and result.return_code == 1
    assert result.stderr.strip().endswith("MemoryError")


def test_fork_bomb_is_capped_and_the_whole_tree_killed(sandbox):
    # Count how many processes the limit allows, then keep forking forever: the wall limit ends it all.
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(n, flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = run(sandbox, code)
    assert result.status == RunStatus.TIME_LIMIT
    # 16 processes in the namespace: bwrap's init and the program itself take two.
    assert int(result.stdout.split()[0]) == SMALL.max_processes - 2
    assert_no_leftovers()
    assert os.waitpid(os.spawnv(os.P_NOWAIT, "/bin/true", ["true"]), 0)[1] == 0  # the host can still fork


def test_no_network_even_to_a_port_the_host_listens_on(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
            "    try:\n"
            "        socket.create_connection(addr, timeout=1).sendall(b'leak')\n"
            "        print('connected', addr)\n"
            "    except OSError as e:\n"
            "        print('blocked', type(e).__name__)\n"
        )
        result = run(sandbox, code)
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
    assert result.stdout.splitlines() == ["blocked ConnectionRefusedError", "blocked OSError"]


def test_no_writes_outside_the_private_tmp(sandbox, tmp_path):
    host_tmp_name = f"/tmp/verl_mega_sandbox_probe_{uuid.uuid4().hex}"
    code = (
        f"for path in ['{tmp_path}/escaped', '/usr/escaped', '/escaped', '/sandbox/main.py', '/proc/escaped']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('denied', type(e).__name__)\n"
        f"open('{host_tmp_name}', 'w').write('private')\n"
        f"print(open('{host_tmp_name}').read())\n"
        "open('big', 'wb').write(bytes(2 << 20))  # over the 1 MiB file-size limit\n"
    )
    result = run(sandbox, code)
    # The host dir does not exist inside; /usr, / and the program are read-only mounts; procfs takes no new files.
    assert result.stdout.splitlines() == [
        "denied FileNotFoundError",
        "denied OSError",
        "denied OSError",
        "denied OSError",
        "denied FileNotFoundError",
        "private",
    ]
    assert result.return_code == 1 and "File too large" in result.stderr
    assert not (tmp_path / "escaped").exists() and not os.path.exists(host_tmp_name)


def test_planted_files_are_invisible(sandbox, tmp_path):
    secret = f"planted-{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(secret)
    host_tmp = f"/tmp/verl_mega_planted_{uuid.uuid4().hex}"
    with open(host_tmp, "w") as f:
        f.write(secret)
    try:
        code = (
            f"import os\nfor path in ['{tmp_path}/secret.txt', '{host_tmp}', '{os.getcwd()}/setup.py', '/etc/passwd', '/root']:\n"
            "    try:\n"
            "        print(open(path).read())\n"
            "    except OSError as e:\n"
            "        print('hidden', type(e).__name__)\n"
            "print(sorted(os.listdir('/')))\n"
        )
        result = run(sandbox, code)
    finally:
        os.unlink(host_tmp)
    assert secret not in result.stdout
    assert result.stdout.splitlines()[:5] == ["hidden FileNotFoundError"] * 5
    usr_links = [name for name in ("bin", "lib", "lib64", "sbin") if os.path.exists(f"/{name}")]
    assert result.stdout.splitlines()[5] == str(sorted(["dev", "proc", "sandbox", "tmp", "usr", *usr_links]))


def test_host_environment_is_invisible(sandbox, monkeypatch):
    secret = f"env-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("VERL_MEGA_TEST_SECRET", secret)
    code = (
        "import os\n"
        "print(sorted(os.environ))\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
    )
    result = run(sandbox, code)
    assert secret not in result.stdout and result.return_code == 0
    assert result.stdout.splitlines()[0] == str(["HOME", "LANG", "PATH", "PWD"])


def test_100mb_of_stdout_is_capped(sandbox):
    result = run(sandbox, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n")
    assert result.status == RunStatus.OUTPUT_LIMIT and result.return_code is None
    assert result.stdout == "x" * SMALL.max_output_bytes
    assert result.execution_time < 1 + MARGIN_S  # killed at the cap, not at the wall limit


def test_killing_its_parent_has_no_effect_on_the_host(sandbox):
    host_pid = os.getpid()
    code = (
        "import os, signal\n"
        f"for pid in [os.getppid(), 1, {host_pid}, {os.getppid()}]:\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        print('sent', pid == os.getppid())\n"
        "    except OSError as e:\n"
        "        print('refused', type(e).__name__)\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)  # every process it can see, except itself (none here)\n"
        "except ProcessLookupError:\n"
        "    pass\n"
        "print('still here')\n"
    )
    result = run(sandbox, code)
    # The parent is the namespace's init (pid 1): the kernel drops SIGKILL sent to it from inside.
    # The host pids do not exist in its pid namespace (unless they collide with a sandbox pid: 1, 2).
    refused = "refused ProcessLookupError"
    assert result.stdout.splitlines() == ["sent True", "sent True", refused, refused, "still here"], result
    assert result.status == RunStatus.FINISHED and result.return_code == 0
    assert os.getppid() > 0 and os.getpid() == host_pid


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the syscall numbers below are x86-64's")
def test_denied_syscalls_fail_with_eperm(sandbox):
    # Raw syscalls through libc: the seccomp filter answers EPERM before the kernel looks at the arguments.
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, nr in [('ptrace', 101), ('keyctl', 250), ('unshare', 272), ('bpf', 321), ('io_uring_setup', 425)]:\n"
        "    ret = libc.syscall(nr, 0, 0, 0, 0)\n"
        "    print(name, ret, os.strerror(ctypes.get_errno()))\n"
        "print('getppid', libc.syscall(110))\n"
    )
    result = run(sandbox, code)
    expected = [f"{name} -1 Operation not permitted" for name in ("ptrace", "keyctl", "unshare", "bpf", "io_uring_setup")]
    assert result.stdout.splitlines() == [*expected, "getppid 1"], result
