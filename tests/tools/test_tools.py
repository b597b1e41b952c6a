"""The tool interface and the Python tools on the local sandbox: schema in a chat template, results as text."""

import asyncio

import pytest

from tests.tools.helpers import make_sandbox
from verl_mega.tools import ExecutionResult, PythonTool, RunStatus, SandboxFusionTool, SandboxLimits, ToolError, format_result

# A tools-aware ChatML template in the style of Qwen2.5's: the tool schemas as JSON in the system turn.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
)


def test_schema_is_an_openai_function_and_renders_in_a_chat_template():
    from verl_mega.testing.tiny_hf import make_tiny_tokenizer

    tool = PythonTool(runner=object())  # schema only: no run
    assert tool.schema() == {
        "type": "function",
        "function": {
            "name": "python",
            "description": PythonTool.description,
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "The Python program to run."}},
                "required": ["code"],
            },
        },
    }
    text = make_tiny_tokenizer().apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tools=[tool.schema()], chat_template=TOOLS_TEMPLATE, tokenize=False
    )
    assert '"name": "python"' in text and '"required": ["code"]' in text and text.endswith("<|im_start|>user\n2+2?<|im_end|>\n")


def test_python_tool_runs_in_the_sandbox_and_reports_failures():
    tool = PythonTool(make_sandbox(), timeout_s=1.0, memory_limit_mb=256)

    async def calls():
        return await asyncio.gather(
            tool.execute(code="print(123 * 456)"),
            tool.execute(code="import sys\nprint('partial')\nsys.exit('bad input')"),
            tool.execute(code="while True:\n    pass"),
        )

    ok, failed, timed_out = asyncio.run(calls())
    assert ok == "56088\n"
    assert failed == "partial\nbad input\n[exit code 1]"
    assert timed_out == "[timed out after 1 s]"
    with pytest.raises(ValueError, match="missing argument 'code'"):
        asyncio.run(tool.execute())
    with pytest.raises(ValueError, match=r"unexpected arguments \['cmd'\]"):
        asyncio.run(tool.execute(code="1", cmd="ls"))


def test_sandbox_fusion_tool_without_url_runs_locally():
    make_sandbox()  # skip/fail as the other sandbox tests when bubblewrap is missing
    tool = SandboxFusionTool(sandbox_fusion_url=None, default_timeout=5, memory_limit_mb=256)
    assert tool.schema()["function"]["name"] == "code_interpreter"
    assert asyncio.run(tool.execute(code="print(sum(range(10)))", language="python")) == "45\n"
    with pytest.raises(ToolError, match=r"^sandbox error: language 'cpp' is not supported"):  # counted as a tool error
        asyncio.run(tool.execute(code="print(1)", language="cpp"))
    with pytest.raises(ValueError, match="http"):
        SandboxFusionTool(sandbox_fusion_url="localhost:8080")


def test_format_result_notes_and_cut():
    def res(status, rc=0, out="", err="", msg=""):
        return ExecutionResult(status, rc, out, err, 0.1, msg)

    assert format_result(res(RunStatus.FINISHED, 0, "a\n", "w\n"), 5) == "a\nw\n"
    assert format_result(res(RunStatus.OUTPUT_LIMIT, None, "xx"), 5) == "xx\n[output limit exceeded; the program was killed]"
    assert format_result(res(RunStatus.ERROR, None, msg="no bwrap"), 5) == "[sandbox error: no bwrap]"
    assert format_result(res(RunStatus.FINISHED, 0, "y" * 10), 5, max_chars=4) == "yyyy\n[... 6 more characters cut]"


def test_limits_validation():
    with pytest.raises(ValueError, match="SandboxLimits.memory_mb must be > 0"):
        SandboxLimits(memory_mb=0)
    assert SandboxLimits(timeout_s=2.5).cpu_s == 4
    with pytest.raises(ValueError, match="timeout_s"):
        PythonTool(runner=object(), timeout_s=0)
