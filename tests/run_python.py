"""Run a Python program of this checkout as a user runs it, in a subprocess (the demo CLI, example scripts):
this checkout first on PYTHONPATH (so the code under test is imported, not an installed copy), one thread per
process, the repository root as working directory, and a failure shown with the tail of the program's output."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_TAIL = 3000  # characters of stdout and of stderr shown when the program fails


def child_env(*paths: str, **variables: str) -> dict[str, str]:
    """This process's environment for a child Python: PYTHONPATH = the checkout, then `paths`, then the inherited
    PYTHONPATH (kept: on the GPU machine it holds the carried wheels), one thread per process, plus `variables`."""
    pythonpath = os.pathsep.join(p for p in (REPO, *paths, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **variables}


def run_python(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    """`python ARGS` (e.g. ["-m", "verl_mega", "demo", ...] or [script, ...]) from the repository root, waited for
    at most `timeout` seconds; asserts it exits 0 (message: the tails of its stdout and stderr) and returns the
    finished process, its stdout and stderr as text."""
    return finish_python(start_python(args), timeout=timeout)


def start_python(args: list[str]) -> subprocess.Popen:
    """`run_python` without the wait: the started process (stdout and stderr piped, as text), to `finish_python`
    later; several can run at once."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_python(proc: subprocess.Popen, *, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a `start_python` process at most `timeout` seconds (then kill it and raise TimeoutExpired); assert
    it exited 0 (message: the tails of its stdout and stderr); return it finished, as `run_python` does."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    args = proc.args[1:]
    assert proc.returncode == 0, (f"python {' '.join(args)} exited {proc.returncode}\n--- stdout\n"
                                  f"{stdout[-OUTPUT_TAIL:]}\n--- stderr\n{stderr[-OUTPUT_TAIL:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
