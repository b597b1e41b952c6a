"""Tools for the agent loop and the code sandbox they (and the code reward) run untrusted code in."""

from verl_mega.tools.base import Tool, ToolError, ToolsDown, ToolUnavailable
from verl_mega.tools.fusion_client import ClientOptions, SandboxFusionClient, SandboxFusionError
from verl_mega.tools.python_tool import PythonTool, SandboxFusionTool, format_result
from verl_mega.tools.sandbox import ExecutionResult, RunStatus, Sandbox, SandboxLimits, SandboxUnavailable
from verl_mega.tools.toolset import ToolCallResult, ToolSet, build_tools

__all__ = [
    "ClientOptions",
    "ExecutionResult",
    "PythonTool",
    "RunStatus",
    "Sandbox",
    "SandboxFusionClient",
    "SandboxFusionError",
    "SandboxFusionTool",
    "SandboxLimits",
    "SandboxUnavailable",
    "Tool",
    "ToolCallResult",
    "ToolError",
    "ToolSet",
    "ToolUnavailable",
    "ToolsDown",
    "build_tools",
    "format_result",
]
