"""Code reward: run the response's Python code against test cases in a resource-limited subprocess.

Each test case runs in its own fresh `python -I` process (so one crash or infinite loop costs one
test), in a temporary working directory, with limits set by `resource.setrlimit` inside the child
before the user code runs: address space (memory), CPU seconds, written file size, no core dumps;
plus a wall-clock limit enforced by the parent, which kills the child's whole process group.
Score = fraction of tests passed.

A test case is either an assert snippet (`"assert add(1, 2) == 3"`, appended to the program) or a
stdin/stdout pair (`{"input": "1 2\\n", "output": "3"}`, compared after stripping whitespace),
the two formats of verl's code rewards (e.g. PRIME / sandbox-fusion datasets).

Simplifications: POSIX only; this is a resource fence, not a security boundary (no seccomp or
network namespace: the child could open sockets if the machine has a network). Run untrusted
model code inside a container as well. Tests of one response run sequentially; `compute_rewards`
parallelises across responses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)

# Runs in the child: limits first, then the program as __main__.
_BOOTSTRAP = """\
import resource, runpy, sys
mem, cpu, fsize = {mem}, {cpu}, {fsize}
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["solution.py"]
runpy.run_path("solution.py", run_name="__main__")
"""


@dataclass
class SandboxResult:
    """Outcome of running one program against its tests."""

    passed: int
    total: int
    errors: list[str]  # one line per failed test (first lines of stderr, or "timeout")

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


def extract_code(response: str) -> str | None:
    """The last fenced code block (```python ... ``` or ``` ... ```) of a response, or None."""
    blocks = _CODE_BLOCK.findall(response)
    return blocks[-1] if blocks else None


def _run_one(program: str, stdin: str, timeout_s: float, memory_mb: int, workdir: Path) -> tuple[int | None, str, str]:
    """Run `program` once; (returncode or None on timeout, stdout, stderr)."""
    (workdir / "solution.py").write_text(program)
    bootstrap = _BOOTSTRAP.format(mem=memory_mb * 2**20, cpu=max(1, int(timeout_s + 1)), fsize=16 * 2**20)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", bootstrap],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # own process group: a timeout kills anything it spawned too
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, "", ""


def run_tests(code: str, tests: list[Any], timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` against `tests` (assert strings or {"input", "output"} dicts), one process per test.

    Args:
        code: a Python program.
        tests: assert snippets and/or stdin/stdout dicts.
        timeout_s: wall-clock limit per test (CPU limit is the same, rounded up).
        memory_mb: address-space limit of the child in MiB.
    """
    errors: list[str] = []
    passed = 0
    with tempfile.TemporaryDirectory(prefix="verl_mega_sandbox_") as tmp:
        for k, test in enumerate(tests):
            if isinstance(test, str):
                program, stdin, expected = f"{code}\n\n{test}\n", "", None
            elif isinstance(test, dict) and "input" in test and "output" in test:
                program, stdin, expected = code, str(test["input"]), str(test["output"])
            else:
                raise ValueError(f"test {k} must be an assert string or a dict with 'input' and 'output', got {test!r:.100}")
            rc, out, err = _run_one(program, stdin, timeout_s, memory_mb, Path(tmp))
            if rc is None:
                errors.append(f"test {k}: timeout after {timeout_s:g}s")
            elif rc != 0:
                last = err.strip().splitlines()[-1] if err.strip() else f"exit code {rc}"
                errors.append(f"test {k}: {last}")
            elif expected is not None and out.strip() != expected.strip():
                errors.append(f"test {k}: expected {expected.strip()!r:.60}, got {out.strip()!r:.60}")
            else:
                passed += 1
    return SandboxResult(passed, len(tests), errors)


def code_compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """verl-style compute_score for code: fraction of `ground_truth` tests the response's last code block passes.

    `ground_truth` is a list of tests or its JSON text; `extra_info` may set `timeout_s` and `memory_mb`.
    A response without a code block scores 0.
    """
    tests = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"code ground_truth must be a non-empty list of tests, got {ground_truth!r:.100}")
    code = extract_code(solution_str)
    if code is None:
        return 0.0
    extra_info = extra_info or {}
    return run_tests(code, tests, extra_info.get("timeout_s", 5.0), extra_info.get("memory_mb", 512)).score
