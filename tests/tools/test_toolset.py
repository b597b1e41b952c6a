"""ToolSet: dispatch by name, every failure an error message for the model, the per-call time limit, the stop
when the backend is gone; build_tools."""

import asyncio
import socket

import pytest

from tests.tools.helpers import make_sandbox
from verl_mega.tools import ClientOptions, PythonTool, SandboxFusionTool, Tool, ToolSet, ToolsDown, build_tools


class Adder(Tool):
    """A deterministic tool (the agent-loop tests' kind): adds two integers, optionally after a delay."""

    name = "add"
    description = "Add two integers."
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}

    async def execute(self, a: int, b: int, delay_s: float = 0.0) -> str:
        if not isinstance(a, int) or not isinstance(b, int):
            raise ValueError("add: 'a' and 'b' must be integers")
        await asyncio.sleep(delay_s)
        if a < 0:
            raise RuntimeError("negative")
        return str(a + b)


def test_calls_and_failures():
    tools = ToolSet([Adder()], timeout_s=0.5)
    assert tools.schemas() == [Adder().schema()]

    async def calls():
        return await asyncio.gather(
            tools.call("add", {"a": 2, "b": 3}),
            tools.call("mul", {"a": 2}),
            tools.call("add", [2, 3]),
            tools.call("add", {"a": 2}),
            tools.call("add", {"a": "2", "b": 3}),
            tools.call("add", {"a": -1, "b": 3}),
            tools.call("add", {"a": 1, "b": 1, "delay_s": 5}),
        )

    ok, unknown, not_object, missing, wrong_type, raised, slow = asyncio.run(calls())
    assert (ok.text, ok.error) == ("5", False)
    assert unknown.error and unknown.text == "[tool error: unknown tool 'mul'; available: ['add']]"
    assert not_object.error and "must be a JSON object, got list" in not_object.text
    assert missing.error and "missing 1 required positional argument: 'b'" in missing.text
    assert wrong_type.text == "[tool error: add: 'a' and 'b' must be integers]"
    assert raised.text == "[tool error: 'add' raised RuntimeError: negative]"
    assert slow.error and slow.text == "[tool error: 'add' did not answer within 0.5 s]" and slow.seconds < 5
    with pytest.raises(ValueError, match="distinct names"):
        ToolSet([Adder(), Adder()])


def test_build_tools_from_config():
    make_sandbox()  # the python tool builds a local sandbox
    tools = build_tools([{"name": "python", "timeout_s": 3}, {"name": "code_interpreter", "sandbox_fusion_url": "http://h:1"}])
    assert isinstance(tools.tools["python"], PythonTool) and tools.tools["python"].timeout_s == 3
    assert isinstance(tools.tools["code_interpreter"], SandboxFusionTool)
    with pytest.raises(ValueError, match=r"tools\[0\].name must be one of"):
        build_tools([{"name": "shell"}])
    with pytest.raises(ValueError, match=r"tools\[0\] \(python\): unknown key\(s\) \['url'\]; it takes \['name', 'timeout_s'"):
        build_tools([{"name": "python", "url": "x"}])
    with pytest.raises(ValueError, match=r"rollout\.tools\[1\] \(code_interpreter\): sandbox_fusion_url must start"):
        build_tools([{"name": "python"}, {"name": "code_interpreter", "sandbox_fusion_url": "h:1"}], key="rollout.tools")


def test_build_tools_names_the_entry_and_the_keys_a_tool_takes():
    """What a YAML slip looks like (no space after a colon, a bare name, a typo'd key) is named, with the fix."""
    with pytest.raises(ValueError, match=r"rollout\.tools\[0\] has no 'name' key \(keys: \['name:code_interpreter'\]\).*space"):
        build_tools([{"name:code_interpreter": None}], key="rollout.tools")
    with pytest.raises(ValueError, match=r"rollout\.tools\[0\] must be a mapping like \{name: code_interpreter\}, got 'code_"):
        build_tools(["code_interpreter"], key="rollout.tools")
    with pytest.raises(ValueError, match=r"rollout\.tools must be a list of tool entries"):
        build_tools({"name": "code_interpreter"}, key="rollout.tools")
    with pytest.raises(ValueError, match=r"\(code_interpreter\): unknown key\(s\) \['default_timeot'\]; it takes \['name', "
                                         r"'sandbox_fusion_url', 'default_timeout', 'memory_limit_mb', 'client_options'"):
        build_tools([{"name": "code_interpreter", "default_timeot": 10}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['runner'\]"):  # an object, not a config value
        build_tools([{"name": "python", "runner": "bwrap"}])
    # client_options from YAML is a mapping: it becomes ClientOptions (it used to reach the client as a dict and
    # fail at the first call with an AttributeError)
    tools = build_tools([{"name": "code_interpreter", "sandbox_fusion_url": "http://h:1", "client_options": {"retries": 1}}])
    assert tools.tools["code_interpreter"].runner.options.retries == 1
    with pytest.raises(ValueError, match=r"tools\[0\] \(code_interpreter\): .*unexpected keyword argument 'retry'"):
        build_tools([{"name": "code_interpreter", "sandbox_fusion_url": "http://h:1", "client_options": {"retry": 1}}])


def dead_sandbox_tool() -> SandboxFusionTool:
    """A code tool pointed at a 127.0.0.1 port nobody listens on, no retries: every call is ToolUnavailable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return SandboxFusionTool(f"http://127.0.0.1:{port}", client_options=ClientOptions(retries=0))


def test_a_dead_backend_stops_the_calls_after_max_unavailable_in_a_row():
    """A sandbox server that dies mid-run used to answer every later call with an error message for the
    whole run; now max_unavailable calls in a row it did not run raise ToolsDown (a call it ran resets the count)."""
    tools = ToolSet([dead_sandbox_tool(), Adder()], max_unavailable=2)

    async def calls():
        try:
            first = await tools.call("code_interpreter", {"code": "print(1)"})
            ok = await tools.call("add", {"a": 1, "b": 2})
            again = await tools.call("code_interpreter", {"code": "print(1)"})
            with pytest.raises(ToolsDown, match=r"^tool 'code_interpreter': 2 calls in a row were not run "
                                                r"\(sandbox unavailable: .*restart the sandbox server"):
                await tools.call("code_interpreter", {"code": "print(1)"})
            after = await tools.call("code_interpreter", {"code": "print(1)"})  # the count starts afresh
            return first, ok, again, after
        finally:
            await tools.aclose()

    first, ok, again, after = asyncio.run(calls())
    assert first.error and first.text.startswith("[tool error: sandbox unavailable: ")
    assert (ok.text, ok.error, again.error, after.error) == ("3", False, True, True)
    with pytest.raises(ValueError, match="max_unavailable must be an integer >= 1"):
        ToolSet([Adder()], max_unavailable=0)
