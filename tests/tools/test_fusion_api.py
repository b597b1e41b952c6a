"""SandboxFusion's /run_code JSON: our request/response match its contract (sandbox/server/sandbox_api.py)."""

import pytest

from verl_mega.tools import ExecutionResult, RunStatus, SandboxLimits
from verl_mega.tools.fusion_api import limits_from_request, parse_run_code_response, run_code_request, run_code_response

# SandboxFusion's documented example response for print('hello').
FUSION_SUCCESS = {
    "status": "Success",
    "message": "",
    "compile_result": None,
    "run_result": {"status": "Finished", "execution_time": 0.05, "return_code": 0, "stdout": "hello\n", "stderr": ""},
    "executor_pod_name": None,
    "files": {},
}


def test_request_uses_sandbox_fusion_field_names():
    assert run_code_request("print(1)", "python", "", 3.0, 256) == {
        "code": "print(1)",
        "language": "python",
        "stdin": "",
        "run_timeout": 3.0,
        "memory_limit_MB": 256,
    }


def test_parse_a_sandbox_fusion_response():
    assert parse_run_code_response(FUSION_SUCCESS) == ExecutionResult(RunStatus.FINISHED, 0, "hello\n", "", 0.05, "")
    tle = {**FUSION_SUCCESS, "status": "Failed", "run_result": {"status": "TimeLimitExceeded", "execution_time": 1.0}}
    assert parse_run_code_response(tle).status == RunStatus.TIME_LIMIT
    error = {"status": "SandboxError", "message": "boom", "run_result": None}
    assert parse_run_code_response(error) == ExecutionResult(RunStatus.ERROR, None, "", "", 0.0, "boom")


def test_response_round_trip_and_status():
    ok = ExecutionResult(RunStatus.FINISHED, 0, "hello\n", "", 0.05)
    assert run_code_response(ok) == FUSION_SUCCESS
    for result, overall in [
        (ExecutionResult(RunStatus.FINISHED, 2, "", "err", 0.1), "Failed"),
        (ExecutionResult(RunStatus.TIME_LIMIT, None, "x", "", 1.0), "Failed"),
        (ExecutionResult(RunStatus.OUTPUT_LIMIT, None, "yy", "", 0.2), "Failed"),
        (ExecutionResult(RunStatus.ERROR, None, "", "", 0.0, "no bwrap"), "SandboxError"),
    ]:
        body = run_code_response(result)
        assert body["status"] == overall
        assert body["run_result"]["status"] in ("Finished", "Error", "TimeLimitExceeded")  # SandboxFusion's enum only
        assert parse_run_code_response(body) == result


def test_request_limits_are_capped_by_the_server():
    server = SandboxLimits(timeout_s=10, memory_mb=512)
    assert limits_from_request({"code": "", "run_timeout": 60, "memory_limit_MB": -1}, server) == server
    small = limits_from_request({"code": "", "run_timeout": 2, "memory_limit_MB": 128}, server)
    assert (small.timeout_s, small.memory_mb, small.max_processes) == (2, 128, server.max_processes)
    for body, field in [
        ({"code": 1}, "code"),
        ({"code": "", "language": "cpp"}, "language"),
        ({"code": "", "files": {"a": "Yg=="}}, "files"),
        ({"code": "", "run_timeout": 0}, "run_timeout"),
    ]:
        with pytest.raises(ValueError, match=field):
            limits_from_request(body, server)
