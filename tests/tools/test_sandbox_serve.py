"""Acceptance item 3: SandboxFusionTool(url=...) against `verl-mega sandbox serve` on 127.0.0.1.

64 concurrent calls, a server killed and restarted while calls are in flight (the client's retries
recover every call), a run time-out, and an unreachable server (retries run out: a ToolError, counted as a tool
error, and a pre-training error).
"""

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.tools.helpers import assert_no_leftovers, make_sandbox
from verl_mega.tools import ClientOptions, SandboxFusionTool, ToolError, ToolSet

START_TIMEOUT_S = 60  # server start-up on a loaded 2-core machine (about 0.5 s idle)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "verl_mega", "sandbox", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--max-concurrency", "8", "--timeout-s", "5", "--memory-mb", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox serve exited: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.read() == b"ok":
                    return proc
        except OSError:
            time.sleep(0.1)
    stop(proc, signal.SIGKILL)
    raise RuntimeError(f"sandbox serve not up after {START_TIMEOUT_S}s")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(timeout=30)
    proc.stderr.close()


@pytest.fixture
def server():
    make_sandbox()  # skip (fail under CI) without bubblewrap
    port = free_port()
    proc = start_server(port)
    holder = {"proc": proc, "port": port}
    yield holder
    stop(holder["proc"])


def tool_for(port: int, **options) -> SandboxFusionTool:
    return SandboxFusionTool(
        f"http://127.0.0.1:{port}", default_timeout=5, memory_limit_mb=256, client_options=ClientOptions(**options)
    )


def test_64_concurrent_calls(server):
    tool = tool_for(server["port"], max_concurrency=64)

    async def calls():
        try:
            return await asyncio.gather(*(tool.execute(code=f"print({i} * {i})") for i in range(64)))
        finally:
            await tool.runner.close()

    assert asyncio.run(calls()) == [f"{i * i}\n" for i in range(64)]
    assert tool.runner.retried == 0


def test_restart_mid_way_is_recovered_by_retries(server):
    tool = tool_for(server["port"], max_concurrency=32, retries=8, backoff_s=0.25, max_backoff_s=2.0)
    done = []

    async def one(i):
        out = await tool.execute(code=f"import time\ntime.sleep(0.3)\nprint({i})")
        done.append(i)
        return out

    async def calls():
        tasks = [asyncio.create_task(one(i)) for i in range(32)]
        while len(done) < 4:  # the first wave answered: the rest are running or queued at the server
            await asyncio.sleep(0.02)
        stop(server["proc"], signal.SIGKILL)  # a crash, mid-way
        server["proc"] = await asyncio.to_thread(start_server, server["port"])
        try:
            return await asyncio.gather(*tasks)
        finally:
            await tool.runner.close()

    assert asyncio.run(calls()) == [f"{i}\n" for i in range(32)]
    assert tool.runner.retried > 0
    # The crashed server's sandboxes end with their programs (or at the backstop): none stays blocked in bwrap.
    assert_no_leftovers(within_s=5 + 5 + 1)  # the server's 5 s limit + the 5 s backstop + reaping


def test_timeout_and_unreachable_server(server):
    tool = SandboxFusionTool(f"http://127.0.0.1:{server['port']}", default_timeout=1, memory_limit_mb=256)
    dead = tool_for(free_port(), retries=2, backoff_s=0.05)  # nothing listens there

    async def call(t, code):
        try:
            return await t.execute(code=code)
        finally:
            await t.runner.close()

    t0 = time.monotonic()
    assert asyncio.run(call(tool, "print('going', flush=True)\nwhile True:\n    pass")) == "going\n[timed out after 1 s]"
    assert time.monotonic() - t0 < 1 + 3  # margin: start-up of bwrap + interpreter on a loaded machine
    with pytest.raises(ToolError, match=r"^sandbox unavailable: .*no answer after 3 attempts"):
        asyncio.run(call(dead, "print(1)"))
    assert dead.runner.retried == 2


def test_a_server_down_is_a_counted_tool_error_and_a_preflight_error(server):
    """A dead server used to answer every call with "[sandbox unavailable: ...]" counted as a success
    (agent/tool_errors 0) and `verl-mega train` started anyway: now the call is an error result, and the
    pre-training check names the tool entry and the fix; a live server passes it."""
    dead = ToolSet([tool_for(free_port(), retries=0)])
    result = asyncio.run(dead.call("code_interpreter", {"code": "print(1)"}))
    assert result.error and result.text.startswith("[tool error: sandbox unavailable: ")
    with pytest.raises(ValueError, match=r"^rollout\.tools\[0\] \(code_interpreter\): sandbox unavailable: .*; start it "
                                         r"\(verl-mega sandbox serve --port PORT\) or fix sandbox_fusion_url"):
        asyncio.run(dead.check("rollout.tools"))
    asyncio.run(ToolSet([tool_for(server["port"])]).check())


def test_agent_tool_runner_closes_the_http_session_of_its_loop(server):
    """Each rollout's tool loop used to leave its aiohttp session open ("Unclosed client session" at exit)."""
    from verl_mega.rollout.agent_loop import _ToolRunner

    tool = tool_for(server["port"])
    runner = _ToolRunner(ToolSet([tool]), lead=True)
    runner.submit((0, 0), [("code_interpreter", {"code": "print(2)"})], timeout_s=30)
    assert [r.text for r in runner.ready(block=True)[0][1]] == ["2\n"]
    assert len(tool.runner._per_loop) == 1  # the session of the runner's loop
    runner.close()
    assert len(tool.runner._per_loop) == 0


def test_bad_flags_and_a_busy_port_are_one_error_line(capsys):
    from verl_mega.apps import sandbox_serve

    assert sandbox_serve.main(["serve", "--port", "99999"]) == 2
    assert "--port must be in [0, 65535], got 99999" in capsys.readouterr().err
    assert sandbox_serve.main(["serve", "--timeout-s", "0"]) == 2
    assert "--timeout-s must be > 0, got 0.0" in capsys.readouterr().err
    make_sandbox()  # skip (fail under CI) without bubblewrap
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert sandbox_serve.main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on --host 127.0.0.1 --port {port}" in err and "Traceback" not in err


def test_a_url_that_is_not_a_sandbox_is_one_error_line():
    """An HTTP server that refuses POST /run_code (here: Python's http.server, 501 and an HTML page) used to put
    the whole page, newlines and all, into the error; the message is now one line naming the endpoint."""
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        tools = ToolSet([tool_for(httpd.server_address[1], retries=0)])
        with pytest.raises(ValueError) as info:
            asyncio.run(tools.check("rollout.tools"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(info.value)
    assert message.startswith(f"rollout.tools[0] (code_interpreter): sandbox error: HTTP 501 from "
                              f"http://127.0.0.1:{httpd.server_address[1]}/run_code: <!DOCTYPE HTML>")
    assert "\n" not in message and len(message) < 600
