"""The tool interface: what the agent loop needs to show a tool to the model and to call it.

A tool has a `name`, a `description` and `parameters` (the JSON schema of its arguments object);
`schema()` is the OpenAI-style function entry that chat templates take as `tools=[...]`
(`tokenizer.apply_chat_template(messages, tools=[t.schema() for t in tools])`). `execute(**arguments)`
is async, so the agent loop can run tools while other sequences keep decoding, and returns the text
that goes back to the model as a `tool` message. A tool reports failures of the call (bad code, a
time-out) in that text, so the model can react; it raises ValueError for a wrong call (bad arguments) and
`ToolError` when the tool itself could not serve the call (`ToolUnavailable`: its sandbox server unreachable):
`ToolSet.call` turns both into an error message for the model, counted in `agent/tool_errors`, and raises
`ToolsDown` once the backend failed many calls in a row. `aclose()` releases what the
tool holds on the running event loop (an HTTP session).

Reference: the OpenAI function-calling schema; verl's `BaseTool` (`get_openai_tool_schema`, `execute`).
"""

from __future__ import annotations

import abc
from typing import Any


class ToolError(RuntimeError):
    """The tool could not serve a call (not the program's fault: e.g. its sandbox server is unreachable)."""


class ToolUnavailable(ToolError):
    """The tool's backend did not run the call at all (its sandbox server unreachable after the client's
    retries); `ToolSet` stops the rollout after `max_unavailable` of these in a row."""


class ToolsDown(RuntimeError):
    """Raised by `ToolSet.call` (and out of the agent loop, on every rank of the model-parallel group) when
    the tools' backend failed `max_unavailable` calls in a row: a dead sandbox server ends the step with this
    message instead of feeding the model error messages for the rest of the run."""


class Tool(abc.ABC):
    """A tool the model can call. Subclasses set `name`, `description`, `parameters` and implement `execute`."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments: {"type": "object", "properties": ..., "required": [...]}

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style tool entry: {"type": "function", "function": {"name", "description", "parameters"}}."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @abc.abstractmethod
    async def execute(self, **arguments: Any) -> str:
        """Run the tool with the model's arguments; the text returned is the tool message."""

    async def check(self) -> None:
        """A trial before training (ToolError if the tool cannot serve calls here); nothing by default."""

    async def aclose(self) -> None:
        """Release what the tool holds on the running event loop (nothing by default)."""
