"""The tools of a rollout: schemas for the chat template, and one `call` that never raises.

The agent loop parses a tool call from the model's text and hands `name` and `arguments` here. Whatever
goes wrong (an unknown tool, arguments that are not an object, a wrong argument, a tool that raises
or runs past `timeout_s`) comes back as a `ToolCallResult` with `error=True` and a message for the
model, so a bad call costs one turn, never the rollout. The one exception: when the tools' backend is
gone (`max_unavailable` calls in a row raised `ToolUnavailable`, e.g. the sandbox server died mid-run),
`call` raises `ToolsDown`, which ends the step with that message. `build_tools` makes a `ToolSet` from config
entries (`rollout.tools: [{name: code_interpreter, sandbox_fusion_url: ..., default_timeout: 30}]`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from verl_mega.tools.base import Tool, ToolError, ToolsDown, ToolUnavailable
from verl_mega.tools.fusion_client import ClientOptions
from verl_mega.tools.python_tool import PythonTool, SandboxFusionTool
from verl_mega.tools.sandbox import SandboxUnavailable

TOOL_CLASSES: dict[str, type[Tool]] = {"python": PythonTool, "code_interpreter": SandboxFusionTool}


@dataclass
class ToolCallResult:
    """One tool call: the tool message, whether the call failed, and its wall time."""

    text: str
    error: bool
    seconds: float


class ToolSet:
    """Tools by name, with a per-call time limit.

    Args:
        tools: tools with distinct names.
        timeout_s: wall-clock limit of one call (None: the tool's own limits only).
    """

    def __init__(self, tools: Sequence[Tool], timeout_s: float | None = None, max_unavailable: int = 16):
        self.tools = {tool.name: tool for tool in tools}
        if len(self.tools) != len(tools):
            raise ValueError(f"tools must have distinct names, got {[tool.name for tool in tools]}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        if not isinstance(max_unavailable, int) or max_unavailable < 1:
            raise ValueError(f"max_unavailable must be an integer >= 1, got {max_unavailable!r}")
        self.timeout_s, self.max_unavailable = timeout_s, max_unavailable
        self.unavailable_in_a_row = 0  # calls the backend did not run since the last one it ran (other failures
        # in between, a bad argument or a time-out, say nothing about the backend and leave the count)

    def schemas(self) -> list[dict[str, Any]]:
        """The `tools=` argument of `tokenizer.apply_chat_template`."""
        return [tool.schema() for tool in self.tools.values()]

    async def call(self, name: str, arguments: Any) -> ToolCallResult:
        """Run tool `name` with `arguments` (a dict); failures become an error message, never an exception,
        except `ToolsDown` after `max_unavailable` calls in a row the backend did not run."""
        t0 = time.monotonic()

        def failed(message: str) -> ToolCallResult:
            return ToolCallResult(f"[tool error: {message}]", True, time.monotonic() - t0)

        tool = self.tools.get(name)
        if tool is None:
            return failed(f"unknown tool {name!r}; available: {sorted(self.tools)}")
        if not isinstance(arguments, dict):
            return failed(f"arguments of {name!r} must be a JSON object, got {type(arguments).__name__}")
        try:
            text = await asyncio.wait_for(tool.execute(**arguments), self.timeout_s)
        except ToolUnavailable as e:
            self.unavailable_in_a_row += 1
            if self.unavailable_in_a_row >= self.max_unavailable:
                count, self.unavailable_in_a_row = self.unavailable_in_a_row, 0  # a reused ToolSet starts afresh
                raise ToolsDown(f"tool {name!r}: {count} calls in a row were not run ({e}); "
                                f"stopping instead of answering every call with an error: restart the "
                                f"sandbox server or fix the tool's sandbox_fusion_url") from None
            return failed(str(e))
        except (asyncio.TimeoutError, TimeoutError):
            return failed(f"{name!r} did not answer within {self.timeout_s:g} s")
        except (ValueError, TypeError, ToolError) as e:
            return failed(str(e))
        except Exception as e:  # a tool bug must not end the rollout; the model sees what happened
            return failed(f"{name!r} raised {type(e).__name__}: {e}")
        self.unavailable_in_a_row = 0
        return ToolCallResult(text, False, time.monotonic() - t0)

    async def check(self, key: str = "tools") -> None:
        """Every tool's `check()` (the code tools: `print(1)` in their sandbox); ValueError naming `key[k]` for
        a tool that cannot serve calls (a sandbox server down, a wrong URL)."""
        try:
            for k, tool in enumerate(self.tools.values()):
                try:
                    await tool.check()
                except ToolError as e:
                    hint = ("; start it (verl-mega sandbox serve --port PORT) or fix sandbox_fusion_url"
                            if getattr(tool, "sandbox_fusion_url", None) else "")
                    raise ValueError(f"{key}[{k}] ({tool.name}): {e}{hint}") from None
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Release what the tools hold on the running event loop (call it before the loop closes)."""
        for tool in self.tools.values():
            await tool.aclose()


def build_tools(specs: Sequence[dict[str, Any]], timeout_s: float | None = None, key: str = "tools") -> ToolSet:
    """A ToolSet from config entries: each {"name": one of TOOL_CLASSES, **constructor arguments} (a
    `client_options` mapping becomes `ClientOptions`). ValueError naming `key[k]` (the config key of the list) for
    an entry that is not a mapping, a missing or unknown name, an unknown key (with the keys the tool takes), a bad
    value, or a local sandbox that cannot run here."""
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"{key} must be a list of tool entries, e.g. [{{name: code_interpreter}}], got {specs!r:.80}")
    tools = []
    for k, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValueError(f"{key}[{k}] must be a mapping like {{name: code_interpreter}}, got {spec!r:.80}")
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"{key}[{k}] has no 'name' key (keys: {sorted(map(str, spec))}); write "
                             f"{{name: code_interpreter}}: YAML needs a space after each colon")
        name = spec.pop("name")
        if name not in TOOL_CLASSES:
            raise ValueError(f"{key}[{k}].name must be one of {sorted(TOOL_CLASSES)}, got {name!r}")
        accepted = config_keys(TOOL_CLASSES[name])
        unknown = sorted(set(spec) - set(accepted))
        if unknown:
            raise ValueError(f"{key}[{k}] ({name}): unknown key(s) {unknown}; it takes {['name', *accepted]}")
        try:
            if isinstance(spec.get("client_options"), Mapping):
                spec["client_options"] = ClientOptions(**spec["client_options"])
            tools.append(TOOL_CLASSES[name](**spec))
        except (TypeError, ValueError, SandboxUnavailable) as e:
            raise ValueError(f"{key}[{k}] ({name}): {e}") from None
    return ToolSet(tools, timeout_s)


def config_keys(cls: type[Tool]) -> list[str]:
    """The constructor arguments of a tool class that a config entry may set (a code runner object may not)."""
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "runner") and params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
