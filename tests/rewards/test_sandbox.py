"""Code reward on the bubblewrap sandbox: tests pass/fail, stdin/stdout, limits, isolation, score = fraction passed."""

import os
import socket
import time
import uuid

import pytest

from tests.tools.helpers import make_sandbox
from verl_mega.rewards import code_compute_score, compute_rewards, extract_code, run_tests


@pytest.fixture(autouse=True)
def _needs_sandbox():
    make_sandbox()  # skip without bubblewrap (fail under CI=true)


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
    r = run_tests(CODE, tests, timeout_s=2.0, memory_mb=256)  # 2 s: a sandboxed start stays well under it on a loaded machine
    assert time.monotonic() - t0 < 10
    assert (r.passed, r.total, r.score) == (1, 4, 0.25), r.errors
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


def test_reward_programs_run_isolated(tmp_path):
    """The issue's measurements through run_tests, now each blocked: a socket to a host port, a planted file, a write."""
    planted = tmp_path / "planted.txt"
    planted.write_text("secret")
    written = f"/tmp/verl_mega_reward_probe_{uuid.uuid4().hex}"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        probes = [
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1)\n"
            "except OSError:\n    pass\nelse:\n    raise SystemExit('connected')",
            f"import os\nassert not os.path.exists('{planted}')",
            f"open('{written}', 'w').write('x')",  # lands in the sandbox's private /tmp, gone with it
        ]
        r = run_tests("", probes, timeout_s=3.0, memory_mb=256)
    assert r.score == 1.0, r.errors
    assert not os.path.exists(written)
