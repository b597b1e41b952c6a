"""The local sandbox: run untrusted code under bubblewrap, with no network, no view of the host and hard limits.

Isolation is bubblewrap's (`bwrap`, the tool Flatpak runs its apps in), not ours. Each run is one
`bwrap` process with every namespace unshared (user, pid, net, ipc, uts, cgroup, mount) and nested
user namespaces disabled. Inside it sees only:
  - /usr (and the /bin, /lib, /lib64, /sbin links or binds a merged-/usr system has), read-only:
    the system interpreter and its standard library, not the trainer's environment;
  - its own /proc (its pid namespace only) and a minimal /dev;
  - a private, size-capped tmpfs at /tmp (the working directory, the one writable place);
  - the program, read-only at /sandbox/main.py;
and an environment of PATH, HOME and LANG only. With no network namespace peers, even 127.0.0.1 is
a fresh loopback that nobody listens on. The root is remounted read-only.

Limits (`SandboxLimits`, the one place their defaults live) are rlimits set by util-linux's `prlimit`
as the first process inside the namespace, so the user's program and everything it spawns inherit
them: address space (memory), CPU seconds, processes, file size, open files, no core dumps. Output is
read by this process through pipes and capped: past `max_output_bytes` on stdout or stderr the run is
killed. The wall-clock limit kills `bwrap`; its in-namespace init dies with it (`--die-with-parent`),
and the kernel kills every process of a pid namespace whose init exits, so an infinite loop, a
background daemon or a fork bomb all end with it.

`bwrap` runs under coreutils' `timeout`, which kills it `_BACKSTOP_S` after the wall limit even if this
process is gone. That also avoids a bwrap 0.8 race seen here: its child waits for the parent to release
it and only then sets its parent-death signal, so a parent that dies in between (a server killed while
starting sandboxes; bwrap's own write to a closed `--json-status-fd`, hence none is used) leaves the
child blocked forever. With `timeout` as bwrap's parent, a crash of this process no longer kills bwrap
mid-start; its runs end at their limits.

Why the sandbox runs as an unprivileged user when the host is root: inside a user namespace made by
root, uid 0 outside is the owner of every process, and the kernel exempts that user from RLIMIT_NPROC
(measured here: 200 forks under a limit of 20). `bwrap` is therefore started as `nobody` (uid 65534,
via subprocess's `user=`), which also makes file permissions a second fence. The interpreter must
then be readable by that user: the default is the system `/usr/bin/python3`.

A seccomp filter (bwrap's `--seccomp`, built once with libseccomp's Python bindings, Debian's
python3-seccomp) makes the syscalls a sandboxed program has no use for fail with EPERM: tracing other
processes, kernel keyrings, BPF, perf events, new namespaces and mounts, io_uring, module loading,
NUMA and clock changes (`DENIED_SYSCALLS`, after Docker's and Flatpak's default profiles). It narrows
the kernel surface the namespaces leave reachable; it is an allow-by-default list, not a whitelist.

Deliberate simplifications: memory is limited per process by RLIMIT_AS, not
by a cgroup, because cgroup delegation differs between machines (v1 here, v2 elsewhere, where a process's
own cgroup cannot get children without systemd delegation). One run may therefore hold up to
`memory_mb x max_processes` (32 GiB at the defaults, if it forks to the limit), and concurrent runs add
up: on a shared host, bound the total from outside (the server's --max-concurrency, a container or
cgroup around `verl-mega sandbox serve`). Only Python is run (SandboxFusion's other languages are not).

Reference: SandboxFusion (bytedance/SandboxFusion) for the result fields and statuses; bubblewrap(1).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, fields, replace

BWRAP = "bwrap"
PRLIMIT = "/usr/bin/prlimit"
TIMEOUT = "/usr/bin/timeout"
SANDBOX_PROGRAM = "/sandbox/main.py"
SANDBOX_WORKDIR = "/tmp"
NOBODY_UID = 65534
_KILL_WAIT_S = 10.0  # how long a killed run may take to be reaped before it is reported as a sandbox error
_BACKSTOP_S = 5.0  # coreutils `timeout` kills bwrap this long after the wall limit if this process could not
_SETUP_ERRORS = ("bwrap: ", "prlimit: ", "timeout: ")  # how bwrap, prlimit and timeout report failing to start a run
# Syscalls that fail with EPERM inside the sandbox (a subset of those Docker's default seccomp profile blocks).
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",  # other processes' memory
    "keyctl", "add_key", "request_key",  # kernel keyrings
    "bpf", "perf_event_open", "userfaultfd",  # frequent kernel-exploit entry points
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",  # namespaces and mounts
    "fsopen", "fsmount", "fspick", "open_tree", "move_mount", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "reboot", "swapon", "swapoff",
    "open_by_handle_at", "name_to_handle_at", "syslog", "acct", "quotactl", "uselib",
    "mbind", "migrate_pages", "move_pages", "set_mempolicy",
    "settimeofday", "clock_settime", "adjtimex",
)  # fmt: skip
# Runs in the sandbox's interpreter: writes the BPF program that denies argv[1] (a JSON list) to stdout.
_BUILD_FILTER = """\
import errno, json, sys
import seccomp
f = seccomp.SyscallFilter(seccomp.ALLOW)
for name in json.loads(sys.argv[1]):
    f.add_rule(seccomp.ERRNO(errno.EPERM), name)
f.export_bpf(sys.stdout)
"""
_ENV = {"PATH": "/usr/bin:/bin", "HOME": SANDBOX_WORKDIR, "LANG": "C.UTF-8"}


class SandboxUnavailable(RuntimeError):
    """bubblewrap, prlimit, timeout, the interpreter or its seccomp bindings are missing."""


class RunStatus(str, enum.Enum):
    """How a run ended; the first three are SandboxFusion's `CommandRunStatus` values."""

    FINISHED = "Finished"  # the program exited (any exit code)
    ERROR = "Error"  # the sandbox itself failed (the program never started)
    TIME_LIMIT = "TimeLimitExceeded"  # killed at the wall-clock limit
    OUTPUT_LIMIT = "OutputLimitExceeded"  # killed for writing more than max_output_bytes (ours; not in SandboxFusion)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. Every default of the sandbox lives here."""

    timeout_s: float = 30.0  # wall-clock limit; the whole process tree is killed at it
    memory_mb: int = 1024  # address space per process (RLIMIT_AS), MiB
    max_processes: int = 32  # processes + threads inside the sandbox (RLIMIT_NPROC, per user namespace)
    max_file_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE), MiB
    tmp_mb: int = 64  # size of the private writable /tmp (a tmpfs), MiB
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # stdout and stderr each; the run is killed past it

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"SandboxLimits.{f.name} must be > 0, got {value!r}")

    @property
    def cpu_s(self) -> int:
        """RLIMIT_CPU per process: the wall limit rounded up, plus 1 s so the wall clock normally fires first."""
        return math.ceil(self.timeout_s) + 1


@dataclass
class ExecutionResult:
    """The structured outcome of one run (SandboxFusion's `CommandRunResult` fields)."""

    status: RunStatus
    return_code: int | None  # the program's exit code (128 + signal if a signal ended it); None if killed by us
    stdout: str
    stderr: str
    execution_time: float  # wall seconds from start to exit
    message: str = ""  # why the sandbox failed, for status ERROR


def _root_entries() -> list[str]:
    """bwrap arguments that reproduce the host's /bin, /lib, /lib64, /sbin as links into /usr or read-only binds."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


class Sandbox:
    """Runs Python programs under bubblewrap with `SandboxLimits`.

    Args:
        limits: default limits of a run (each `run` may pass its own).
        python: interpreter inside the sandbox; it must live under /usr (the only host tree mounted)
            and be readable by `sandbox_uid`.
        sandbox_uid: the unprivileged uid `bwrap` runs as when this process is root (see module doc).
    """

    def __init__(self, limits: SandboxLimits | None = None, python: str = "/usr/bin/python3", sandbox_uid: int = NOBODY_UID):
        self.limits = limits or SandboxLimits()
        if not python.startswith("/usr/"):
            raise ValueError(f"python must be an interpreter under /usr (the only host tree in the sandbox), got {python!r}")
        self.python = python
        self.sandbox_uid = sandbox_uid
        self._bwrap = shutil.which(BWRAP)
        if self._bwrap is None or not all(os.path.exists(p) for p in (PRLIMIT, TIMEOUT, python)):
            raise SandboxUnavailable(
                f"the sandbox needs {BWRAP}, {PRLIMIT}, {TIMEOUT} and {python}: install them with "
                "`apt-get install -y bubblewrap util-linux coreutils python3 python3-seccomp` (or run .ci/system_deps.sh)"
            )
        self.seccomp_filter = _seccomp_filter(python)

    def command(self, limits: SandboxLimits, program_fd: int, filter_fd: int) -> list[str]:
        """The command line of one run (the program is read from `program_fd`, the seccomp BPF from `filter_fd`)."""
        env_args = [a for key, value in _ENV.items() for a in ("--setenv", key, value)]
        rlimits = [
            f"--as={limits.memory_mb << 20}",
            f"--cpu={limits.cpu_s}",
            f"--nproc={limits.max_processes}",
            f"--fsize={limits.max_file_mb << 20}",
            f"--nofile={limits.max_open_files}",
            "--core=0",
        ]
        return [
            TIMEOUT, "--signal=KILL", f"{limits.timeout_s + _BACKSTOP_S:g}",  # outlives a crash of this process
            self._bwrap,
            "--unshare-all", "--unshare-user", "--disable-userns",  # every namespace; no nested user namespaces
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox", "--clearenv", *env_args,
            *_root_entries(),
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.tmp_mb << 20), "--tmpfs", SANDBOX_WORKDIR,
            "--ro-bind-data", str(program_fd), SANDBOX_PROGRAM,
            "--remount-ro", "/",
            "--chdir", SANDBOX_WORKDIR,
            "--seccomp", str(filter_fd),
            "--", PRLIMIT, *rlimits, "--", self.python, "-I", "-B", SANDBOX_PROGRAM,
        ]  # fmt: skip

    async def run(
        self, code: str, stdin: str = "", limits: SandboxLimits | None = None, language: str = "python"
    ) -> ExecutionResult:
        """Run `code` (a Python program) with `stdin`; returns once it exited or was killed (at `limits.timeout_s`)."""
        if language != "python":
            raise ValueError(f"language must be 'python' (the only language of the local sandbox), got {language!r}")
        limits = limits or self.limits
        with tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as seccomp_filter:
            for f, data in ((program, code.encode()), (seccomp_filter, self.seccomp_filter)):
                f.write(data)
                f.seek(0)
            return await self._run(limits, program.fileno(), seccomp_filter.fileno(), stdin.encode())

    async def _run(self, limits: SandboxLimits, program_fd: int, filter_fd: int, stdin: bytes) -> ExecutionResult:
        as_user = {}
        if os.geteuid() == 0:
            as_user = dict(user=self.sandbox_uid, group=self.sandbox_uid, extra_groups=[])
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self.command(limits, program_fd, filter_fd),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            pass_fds=(program_fd, filter_fd), env=dict(_ENV), start_new_session=True, **as_user,
        )  # fmt: skip
        out, err = bytearray(), bytearray()
        killed: list[RunStatus] = []

        def kill(reason: RunStatus) -> None:
            if not killed:
                killed.append(reason)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # timeout and bwrap; the namespace dies with bwrap

        async def read(stream: asyncio.StreamReader, buf: bytearray) -> None:
            # Read to EOF even past the cap: asyncio's wait() returns only after the pipes close.
            while chunk := await stream.read(1 << 16):
                buf += chunk[: limits.max_output_bytes - len(buf)]
                if len(buf) >= limits.max_output_bytes:
                    kill(RunStatus.OUTPUT_LIMIT)

        async def feed() -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin)
                await proc.stdin.drain()
                proc.stdin.close()

        try:
            await asyncio.wait_for(
                asyncio.gather(read(proc.stdout, out), read(proc.stderr, err), feed(), proc.wait()), limits.timeout_s
            )
        except (asyncio.TimeoutError, TimeoutError):
            kill(RunStatus.TIME_LIMIT)
        except BaseException:
            kill(RunStatus.ERROR)  # cancelled (e.g. a tool timeout upstream): never leave a sandbox running
            raise
        try:
            await asyncio.wait_for(proc.wait(), _KILL_WAIT_S)
        except (asyncio.TimeoutError, TimeoutError):
            return ExecutionResult(
                RunStatus.ERROR, None, "", "", time.monotonic() - t0, f"bwrap not reaped {_KILL_WAIT_S}s after kill"
            )
        elapsed = time.monotonic() - t0
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if killed:
            return ExecutionResult(killed[0], None, stdout, stderr, elapsed)
        if proc.returncode == 1 and stderr.startswith(_SETUP_ERRORS):  # the program never ran
            return ExecutionResult(RunStatus.ERROR, proc.returncode, stdout, "", elapsed, stderr.strip())
        return ExecutionResult(RunStatus.FINISHED, proc.returncode, stdout, stderr, elapsed)

    async def run_code(
        self,
        code: str,
        language: str = "python",
        stdin: str = "",
        timeout_s: float | None = None,
        memory_limit_mb: int | None = None,
    ) -> ExecutionResult:
        """`run` with the limits overridden per call: the code-runner interface shared with `SandboxFusionClient`.

        Like a SandboxFusion server, it answers a request it cannot run (another language) with status ERROR.
        """
        if language != "python":
            return ExecutionResult(RunStatus.ERROR, None, "", "", 0.0, f"language {language!r} is not supported (only 'python')")
        limits = self.limits
        if timeout_s is not None:
            limits = replace(limits, timeout_s=timeout_s)
        if memory_limit_mb is not None:
            limits = replace(limits, memory_mb=memory_limit_mb)
        return await self.run(code, stdin, limits, language)

    def run_sync(self, code: str, stdin: str = "", limits: SandboxLimits | None = None) -> ExecutionResult:
        """Blocking `run`, for synchronous callers (in a thread of its own if this thread runs an event loop)."""
        coro = self.run(code, stdin, limits)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        box: list = []
        thread = threading.Thread(target=lambda: box.append(asyncio.run(coro)), name="sandbox-run")
        thread.start()
        thread.join()
        return box[0]


@functools.lru_cache(maxsize=None)
def _seccomp_filter(python: str) -> bytes:
    """The BPF program denying DENIED_SYSCALLS, built with libseccomp by `python` (once per interpreter)."""
    build = subprocess.run(
        [python, "-I", "-c", _BUILD_FILTER, json.dumps(DENIED_SYSCALLS)], capture_output=True, timeout=60, env=dict(_ENV)
    )
    if build.returncode != 0 or not build.stdout:
        raise SandboxUnavailable(
            f"could not build the seccomp filter with {python} (install python3-seccomp): {build.stderr.decode()[-500:]}"
        )
    return build.stdout
