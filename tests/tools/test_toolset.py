"""ToolSet: dispatch by name, every failure an error message for the model, the per-call time limit; build_tools."""

import asyncio

import pytest

from tests.tools.helpers import make_sandbox
from verl_mega.tools import PythonTool, SandboxFusionTool, Tool, ToolSet, build_tools


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
    with pytest.raises(ValueError, match=r"tools\[0\] \(python\): .*unexpected keyword argument 'url'"):
        build_tools([{"name": "python", "url": "x"}])
    with pytest.raises(ValueError, match=r"rollout\.tools\[1\] \(code_interpreter\): sandbox_fusion_url must start"):
        build_tools([{"name": "python"}, {"name": "code_interpreter", "sandbox_fusion_url": "h:1"}], key="rollout.tools")
