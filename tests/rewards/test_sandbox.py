"""Code sandbox: tests pass/fail, stdin/stdout, wall and memory limits, score = fraction passed."""

import time

import pytest

from verl_mega.rewards import code_compute_score, compute_rewards, extract_code, run_tests

CODE = "def add(a, b):\n    return a + b\n"


def test_extract_code():
    assert extract_code("hi\n```python\nx = 1\n```\nand\n```\ny = 2\n```") == "y = 2\n"
    assert extract_code("no code") is None


def test_asserts_stdio_and_limits():
    tests = [
        "assert add(1, 2) == 3",
        "assert add(1, 2) == 4",  # wrong
        "import time\nwhile True: pass",  # CPU loop: killed at the wall limit
        "x = bytearray(2 * 1024**3)",  # 2 GiB > memory limit -> MemoryError
    ]
    t0 = time.monotonic()
    r = run_tests(CODE, tests, timeout_s=1.0, memory_mb=256)
    assert time.monotonic() - t0 < 8
    assert (r.passed, r.total, r.score) == (1, 4, 0.25)
    assert "AssertionError" in r.errors[0] and "timeout" in r.errors[1] and "MemoryError" in r.errors[2]

    echo = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
    r = run_tests(echo, [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2", "output": "5"}])
    assert r.score == 0.5 and "expected '5', got '4'" in r.errors[0]
    with pytest.raises(ValueError, match="test 0"):
        run_tests(CODE, [{"stdin": "x"}])


def test_code_compute_score_via_compute_rewards():
    response = f"Here you go:\n```python\n{CODE}```"
    gt = '["assert add(2, 2) == 4", "assert add(0, 0) == 0"]'
    r = compute_rewards(code_compute_score, [response, "no code"], [{"data_source": "code", "ground_truth": gt}] * 2)
    assert r.scores.tolist() == [1.0, 0.0] and r.failures == 0
