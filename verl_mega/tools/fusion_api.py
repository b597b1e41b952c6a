"""SandboxFusion's `POST /run_code` wire format: request and response JSON <-> our `ExecutionResult`.

The contract, from bytedance/SandboxFusion (sandbox/server/sandbox_api.py, sandbox/runners/types.py):

    request  {"code": str, "language": "python", "run_timeout": float = 10, "compile_timeout": float = 10,
              "memory_limit_MB": int = -1 (no limit), "stdin": str | None, "files": {}, "fetch_files": [], "args": []}
    response {"status": "Success" | "Failed" | "SandboxError", "message": str,
              "compile_result": CommandRunResult | None, "run_result": CommandRunResult | None,
              "executor_pod_name": str | None, "files": {}}
    CommandRunResult {"status": "Finished" | "Error" | "TimeLimitExceeded", "execution_time": float | None,
                      "return_code": int | None, "stdout": str | None, "stderr": str | None}
    status: SandboxError if a command's status is Error; Failed on a time-out or a non-zero return code; else Success.

Our `OutputLimitExceeded` has no SandboxFusion status: it goes on the wire as `Finished` with return code
137 (the SIGKILL that ended it) and a note on stderr, so a stock SandboxFusion client still parses it.
The client and the server of this package both use this module.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from verl_mega.tools.sandbox import ExecutionResult, RunStatus, SandboxLimits

KILLED_RETURN_CODE = 137  # 128 + SIGKILL
OUTPUT_LIMIT_NOTE = "\n[sandbox: output limit exceeded; process killed]\n"


def run_code_request(code: str, language: str, stdin: str, run_timeout: float, memory_limit_mb: int) -> dict[str, Any]:
    """The JSON body of a `/run_code` request."""
    return {"code": code, "language": language, "stdin": stdin, "run_timeout": run_timeout, "memory_limit_MB": memory_limit_mb}


def limits_from_request(body: dict[str, Any], server: SandboxLimits) -> SandboxLimits:
    """The limits of one request: its `run_timeout` / `memory_limit_MB`, never above the server's own limits.

    Raises ValueError naming the field for a malformed request (non-string code, unsupported files, ...).
    """
    if not isinstance(body.get("code"), str):
        raise ValueError("request field 'code' must be a string")
    if body.get("language", "python") != "python":
        raise ValueError(
            f"request field 'language' must be 'python' (the local sandbox runs Python only), got {body.get('language')!r}"
        )
    if body.get("files") or body.get("fetch_files"):
        raise ValueError("request fields 'files' / 'fetch_files' are not supported by this server")
    if not isinstance(body.get("stdin") or "", str):
        raise ValueError("request field 'stdin' must be a string or null")
    try:
        timeout = float(body.get("run_timeout", 10))
        memory = int(body.get("memory_limit_MB", -1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"request fields 'run_timeout' / 'memory_limit_MB' must be numbers: {e}") from None
    if timeout <= 0:
        raise ValueError(f"request field 'run_timeout' must be > 0, got {timeout}")
    memory_mb = server.memory_mb if memory <= 0 else min(memory, server.memory_mb)
    return replace(server, timeout_s=min(timeout, server.timeout_s), memory_mb=memory_mb)


def run_code_response(result: ExecutionResult) -> dict[str, Any]:
    """The JSON body of a `/run_code` response for one local run."""
    status, return_code, stderr = result.status.value, result.return_code, result.stderr
    if result.status == RunStatus.OUTPUT_LIMIT:
        status, return_code, stderr = RunStatus.FINISHED.value, KILLED_RETURN_CODE, stderr + OUTPUT_LIMIT_NOTE
    run_result = {
        "status": status,
        "execution_time": result.execution_time,
        "return_code": return_code,
        "stdout": result.stdout,
        "stderr": stderr,
    }
    if status == RunStatus.ERROR.value:
        overall, message = "SandboxError", result.message
    elif status == RunStatus.FINISHED.value and return_code == 0:
        overall, message = "Success", ""
    else:
        overall, message = "Failed", ""
    return {
        "status": overall,
        "message": message,
        "compile_result": None,
        "run_result": run_result,
        "executor_pod_name": None,
        "files": {},
    }


def error_response(message: str) -> dict[str, Any]:
    """A `SandboxError` response with no run (bad request, sandbox unavailable)."""
    return {
        "status": "SandboxError",
        "message": message,
        "compile_result": None,
        "run_result": None,
        "executor_pod_name": None,
        "files": {},
    }


def parse_run_code_response(body: dict[str, Any]) -> ExecutionResult:
    """An `ExecutionResult` from a `/run_code` response (ours or a real SandboxFusion server's)."""
    run = body.get("run_result") or body.get("compile_result")
    if body.get("status") == "SandboxError" or run is None:
        return ExecutionResult(RunStatus.ERROR, None, "", "", 0.0, body.get("message") or "sandbox returned no run result")
    stderr = run.get("stderr") or ""
    status = RunStatus(run.get("status", RunStatus.ERROR.value))
    if status == RunStatus.FINISHED and stderr.endswith(OUTPUT_LIMIT_NOTE):
        status, stderr = RunStatus.OUTPUT_LIMIT, stderr[: -len(OUTPUT_LIMIT_NOTE)]
    return_code = None if status == RunStatus.OUTPUT_LIMIT else run.get("return_code")
    return ExecutionResult(
        status, return_code, run.get("stdout") or "", stderr, float(run.get("execution_time") or 0.0), body.get("message") or ""
    )
