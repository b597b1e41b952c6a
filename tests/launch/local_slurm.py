"""A real single-host SLURM cluster in a temporary directory, for the launcher tests.

`LocalSlurm(root, nodes=2).start()` generates a munge key, starts `munged` on its own socket, writes a
`slurm.conf` (one partition, `nodes` node entries all on 127.0.0.1, each with its own slurmd port, i.e. the
"multiple slurmd" set-up SLURM's own test suite uses), starts `slurmctld` and one `slurmd -N nodeK` per node,
and waits until every node is idle. Clients (`sbatch`, `scontrol`) find the cluster through `env()`
(SLURM_CONF). Accounting is off (no slurmdbd), so a finished job's state and exit code are read from
`scontrol show job` (kept for MinJobAge = 1 h) rather than sacct.

Deliberate simplifications: proctrack/linuxproc and task/none (no cgroups: containers rarely delegate them),
root as SlurmUser (the daemons run as whoever starts them).
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import socket
import subprocess
import time

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + `nodes` slurmd daemons on localhost, configured and logged under `root`."""

    def __init__(self, root: str, nodes: int = 2, cpus_per_node: int = 1):
        self.root, self.nodes, self.cpus_per_node = root, nodes, cpus_per_node
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge.sock")

    def env(self) -> dict:
        """The environment for SLURM clients talking to this cluster (the current one plus SLURM_CONF)."""
        return {**os.environ, "SLURM_CONF": self.conf}

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _write_conf(self) -> None:
        user, host = getpass.getuser(), socket.gethostname().split(".")[0]  # slurm compares short names
        ports = [_free_port() for _ in range(self.nodes + 1)]
        nodes = "\n".join(f"NodeName=n{k} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[k]} "
                          f"CPUs={self.cpus_per_node} State=UNKNOWN" for k in range(1, self.nodes + 1))
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=verlmega
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self._path("state")}
SlurmdSpoolDir={self._path("spool", "%n")}
SlurmctldPidFile={self._path("slurmctld.pid")}
SlurmdPidFile={self._path("slurmd-%n.pid")}
SlurmctldLogFile={self._path("log", "slurmctld.log")}
SlurmdLogFile={self._path("log", "slurmd-%n.log")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=5
MpiDefault=none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 60.0) -> "LocalSlurm":
        """Start munged, slurmctld and the slurmd daemons; wait until `sinfo` shows every node idle."""
        for sub in ("state", "spool", "log"):
            os.makedirs(self._path(sub), exist_ok=True)
        key = self._path("munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        subprocess.run(["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--log-file={self._path('log', 'munged.log')}", f"--pid-file={self._path('munged.pid')}",
                        f"--seed-file={self._path('munged.seed')}"], check=True, timeout=30)
        self._write_conf()
        subprocess.run(["slurmctld", "-f", self.conf], check=True, timeout=30, env=self.env())
        for k in range(1, self.nodes + 1):
            subprocess.run(["slurmd", "-N", f"n{k}", "-f", self.conf], check=True, timeout=30, env=self.env())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                                 env=self.env(), timeout=30).stdout.split("\n")
            if sum(line.split()[1:] == ["idle"] for line in out if line.strip()) == self.nodes:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s}s: {out}; logs in {self._path('log')}:\n"
                           + self.logs())

    def logs(self) -> str:
        """The tail of every daemon log (for failure messages)."""
        parts = []
        for name in sorted(os.listdir(self._path("log"))):
            with open(self._path("log", name), errors="replace") as f:
                parts.append(f"--- {name}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Shut the daemons down: `scontrol shutdown`, SIGTERM (by pid file) to any left after 5 s, then munged."""
        subprocess.run(["scontrol", "shutdown"], capture_output=True, env=self.env(), timeout=30)
        slurm_pids = [self._pid(f"slurmd-n{k}.pid") for k in range(1, self.nodes + 1)] + [self._pid("slurmctld.pid")]
        for pids, grace_s in ((slurm_pids, 5.0), (slurm_pids + [self._pid("munged.pid")], 0.0)):
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
            for pid in filter(_alive, pids):
                os.kill(pid, signal.SIGTERM)

    def _pid(self, name: str) -> int | None:
        try:
            with open(self._path(name)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def submit(self, args: list[str], cwd: str, env: dict | None = None) -> int:
        """`sbatch --parsable ARGS` from `cwd`; returns the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True,
                             env={**self.env(), **(env or {})}, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             env=self.env(), timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout_s: float) -> dict:
        """Poll until the job is in a terminal state; its `scontrol show job` fields (TimeoutError after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", str(job_id)], env=self.env(), timeout=30)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout_s}s")


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True

