"""Code reward: run the response's Python code against test cases in the bubblewrap sandbox.

Each test case runs in its own fresh sandbox (`verl_mega.tools.sandbox.Sandbox`: no network, no view
of the host's files or environment, a private /tmp, limits on time, memory, processes, file and
output size; see that module for the guarantees), so one crash or infinite loop costs one test.
Score = fraction of tests passed.

A test case is either an assert snippet (`"assert add(1, 2) == 3"`, appended to the program) or a
stdin/stdout pair (`{"input": "1 2\\n", "output": "3"}`, compared after stripping whitespace),
the two formats of verl's code rewards (e.g. PRIME / sandbox-fusion datasets).

Simplifications: tests of one response run sequentially; `compute_rewards` parallelises across
responses (each sync reward call runs in its own thread, with its own event loop).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from verl_mega.tools.sandbox import ExecutionResult, RunStatus, Sandbox

_CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


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


def _check(k: int, result: ExecutionResult, expected: str | None, timeout_s: float) -> str | None:
    """None if test `k` passed, else its one-line error."""
    if result.status == RunStatus.TIME_LIMIT:
        return f"test {k}: timeout after {timeout_s:g}s"
    if result.status == RunStatus.OUTPUT_LIMIT:
        return f"test {k}: output limit exceeded"
    if result.status == RunStatus.ERROR:
        return f"test {k}: sandbox error: {result.message}"
    if result.return_code != 0:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit code {result.return_code}"
        return f"test {k}: {last}"
    if expected is not None and result.stdout.strip() != expected.strip():
        return f"test {k}: expected {expected.strip()!r:.60}, got {result.stdout.strip()!r:.60}"
    return None


def run_tests(
    code: str, tests: list[Any], timeout_s: float = 5.0, memory_mb: int = 512, sandbox: Sandbox | None = None
) -> SandboxResult:
    """Run `code` against `tests` (assert strings or {"input", "output"} dicts), one sandbox per test.

    Args:
        code: a Python program.
        tests: assert snippets and/or stdin/stdout dicts.
        timeout_s: wall-clock limit per test.
        memory_mb: memory limit per test in MiB.
        sandbox: the sandbox to run in (default: a new `Sandbox()` with its other default limits).
    """
    programs = []
    for k, test in enumerate(tests):
        if isinstance(test, str):
            programs.append((f"{code}\n\n{test}\n", "", None))
        elif isinstance(test, dict) and "input" in test and "output" in test:
            programs.append((code, str(test["input"]), str(test["output"])))
        else:
            raise ValueError(f"test {k} must be an assert string or a dict with 'input' and 'output', got {test!r:.100}")
    sandbox = sandbox or Sandbox()
    limits = replace(sandbox.limits, timeout_s=timeout_s, memory_mb=memory_mb)
    errors: list[str] = []
    for k, (program, stdin, expected) in enumerate(programs):
        error = _check(k, sandbox.run_sync(program, stdin, limits), expected, timeout_s)
        if error is not None:
            errors.append(error)
    return SandboxResult(len(tests) - len(errors), len(tests), errors)


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
