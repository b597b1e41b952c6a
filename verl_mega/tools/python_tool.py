"""Python-execution tools: the model writes a program, a sandbox runs it, the output is the answer.

`PythonTool` runs on any code runner with `async run_code(code, language, stdin, timeout_s,
memory_limit_mb) -> ExecutionResult`: the local `Sandbox` (bubblewrap) or a `SandboxFusionClient`.
`SandboxFusionTool` is the seed's constructor over the same tool: with a URL it speaks SandboxFusion's
HTTP API, without one it runs the local sandbox.

What the model sees (`format_result`): stdout, then stderr, then a bracketed note when the run did not
end cleanly (exit code, time-out, output cap, sandbox error), cut to `max_result_chars`.
"""

from __future__ import annotations

from typing import Any, Protocol

from verl_mega.tools.base import Tool, ToolError, ToolUnavailable
from verl_mega.tools.fusion_client import ClientOptions, SandboxFusionClient, SandboxFusionError
from verl_mega.tools.sandbox import ExecutionResult, RunStatus, Sandbox, SandboxLimits

_DEFAULT = SandboxLimits()
MAX_RESULT_CHARS = 4000  # a tool message longer than this is cut (the rest would only fill the context)


class CodeRunner(Protocol):
    async def run_code(
        self, code: str, language: str = "python", stdin: str = "", timeout_s: float = ..., memory_limit_mb: int = ...
    ) -> ExecutionResult: ...


def format_result(result: ExecutionResult, timeout_s: float, max_chars: int = MAX_RESULT_CHARS) -> str:
    """The tool message of one run: stdout + stderr + a note on how it ended, at most `max_chars` characters."""
    text, note = result.stdout + result.stderr, None
    if result.status == RunStatus.TIME_LIMIT:
        note = f"[timed out after {timeout_s:g} s]"
    elif result.status == RunStatus.OUTPUT_LIMIT:
        note = "[output limit exceeded; the program was killed]"
    elif result.status == RunStatus.ERROR:
        note = f"[sandbox error: {result.message}]"
    elif result.return_code != 0:
        note = f"[exit code {result.return_code}]"
    if note is not None:
        text += ("" if not text or text.endswith("\n") else "\n") + note
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[... {len(text) - max_chars} more characters cut]"
    return text


class PythonTool(Tool):
    """Runs the model's Python program on `runner` and returns what it printed.

    Args:
        runner: a `Sandbox` (default: a local one) or a `SandboxFusionClient`.
        timeout_s: wall-clock limit of one program.
        memory_limit_mb: memory limit of one program.
        max_result_chars: the tool message is cut to this length.
    """

    name = "python"
    description = (
        "Run a Python 3 program in a sandbox (no network, no files kept) and return its printed output. "
        "Use print() to show results."
    )
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python program to run."}},
        "required": ["code"],
    }

    def __init__(
        self,
        runner: CodeRunner | None = None,
        timeout_s: float = _DEFAULT.timeout_s,
        memory_limit_mb: int = _DEFAULT.memory_mb,
        max_result_chars: int = MAX_RESULT_CHARS,
    ):
        if timeout_s <= 0 or memory_limit_mb <= 0 or max_result_chars <= 0:
            raise ValueError(
                "timeout_s, memory_limit_mb and max_result_chars must be > 0, "
                f"got {timeout_s}, {memory_limit_mb}, {max_result_chars}"
            )
        self.runner = runner if runner is not None else Sandbox()
        self.timeout_s, self.memory_limit_mb, self.max_result_chars = timeout_s, memory_limit_mb, max_result_chars

    async def run(self, code: str, language: str = "python", stdin: str = "") -> ExecutionResult:
        """The structured result of one program (for rewards and tests; `execute` formats it for the model)."""
        if not isinstance(code, str):
            raise ValueError(f"argument 'code' must be a string, got {type(code).__name__}")
        return await self.runner.run_code(code, language, stdin, timeout_s=self.timeout_s, memory_limit_mb=self.memory_limit_mb)

    async def execute(self, code: str | None = None, language: str = "python", **unexpected: Any) -> str:
        """Run `code`; returns its output (or how the program failed) as the tool message. ToolError when the
        sandbox did not run it (server unreachable, sandbox error), so the call counts as a tool error."""
        if code is None:
            raise ValueError(f"{self.name}: missing argument 'code'")
        if unexpected:
            raise ValueError(f"{self.name}: unexpected arguments {sorted(unexpected)} (it takes 'code' and 'language')")
        try:
            result = await self.run(code, language)
        except SandboxFusionError as e:
            raise ToolUnavailable(f"sandbox unavailable: {e}") from None
        if result.status == RunStatus.ERROR:
            raise ToolError(f"sandbox error: {result.message}")
        return format_result(result, self.timeout_s, self.max_result_chars)

    async def check(self) -> None:
        """Run `print(1)` once: ToolError unless the sandbox (local or the server at the URL) answers `1`."""
        text = await self.execute(code="print(1)")
        if text != "1\n":
            raise ToolError(f"the sandbox ran print(1) and answered {text!r:.200}")

    async def aclose(self) -> None:
        """Close the HTTP session of a SandboxFusion runner on the running loop (a local sandbox holds none)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            await close()


class SandboxFusionTool(PythonTool):
    """The seed's code tool: SandboxFusion's HTTP API at `sandbox_fusion_url`, or the local sandbox when it is None.

    `client_options` sets the HTTP client's concurrency, retries and timeouts (see `ClientOptions`).
    """

    name = "code_interpreter"

    def __init__(
        self,
        sandbox_fusion_url: str | None = None,
        default_timeout: float = _DEFAULT.timeout_s,
        memory_limit_mb: int = _DEFAULT.memory_mb,
        client_options: ClientOptions | None = None,
        max_result_chars: int = MAX_RESULT_CHARS,
    ):
        runner = Sandbox() if sandbox_fusion_url is None else SandboxFusionClient(sandbox_fusion_url, client_options)
        super().__init__(runner, default_timeout, memory_limit_mb, max_result_chars)
        self.sandbox_fusion_url = sandbox_fusion_url
