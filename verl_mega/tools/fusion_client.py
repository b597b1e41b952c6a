"""An async client of SandboxFusion's `POST /run_code` (a real SandboxFusion or `verl-mega sandbox serve`).

aiohttp gives the connection pool (`TCPConnector(limit=...)`, keep-alive reused across calls) and the
timeouts; on top of it: a concurrency limit (a semaphore: at most `max_concurrency` requests in
flight from this client, the rest wait), and retries with exponential backoff on what a restart or an
overloaded server looks like (connection refused or reset, a timeout, HTTP 429/5xx). A run that
reached the server and came back (even `Failed` or `SandboxError`) is not retried: the program ran, or
the request was refused (HTTP 4xx other than 429, returned as status ERROR with the server's text).

aiohttp sessions and asyncio semaphores belong to one event loop; the client keeps one of each per
loop, so one client serves `asyncio.run` calls in turn (a reward thread, a test) as well as a long loop.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass

import aiohttp

from verl_mega.tools.fusion_api import parse_run_code_response, run_code_request
from verl_mega.tools.sandbox import ExecutionResult, RunStatus

_RETRY_HTTP = {429, 500, 502, 503, 504}
MAX_BODY_CHARS = 300  # of a refusal's body in the error message


class SandboxFusionError(RuntimeError):
    """The server could not be reached (or kept failing) through every retry."""


@dataclass(frozen=True)
class ClientOptions:
    """Connection behaviour of a `SandboxFusionClient` (one place for its defaults)."""

    max_concurrency: int = 32  # requests in flight from this client; also the connection-pool size
    retries: int = 4  # attempts after the first
    backoff_s: float = 0.25  # first retry waits this, then doubles ...
    max_backoff_s: float = 4.0  # ... up to this
    connect_timeout_s: float = 5.0  # to open a connection
    slack_s: float = 30.0  # a request may take run_timeout + this (queueing at the server, start-up)

    def __post_init__(self):
        if self.max_concurrency < 1 or self.retries < 0 or self.backoff_s < 0 or self.connect_timeout_s <= 0 or self.slack_s < 0:
            raise ValueError(
                "ClientOptions needs max_concurrency >= 1, retries, backoff_s, slack_s >= 0 and connect_timeout_s > 0; "
                f"got {self}"
            )


class SandboxFusionClient:
    """Runs code through a SandboxFusion-compatible server at `url` (e.g. "http://127.0.0.1:8080")."""

    def __init__(self, url: str, options: ClientOptions | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"sandbox_fusion_url must start with http:// or https://, got {url!r}")
        self.endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/run_code") else "/run_code")
        self.options = options or ClientOptions()
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (session, semaphore)
        self.retried = 0  # attempts repeated so far (a metric: a restart or an overloaded server shows here)

    def _state(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None or state[0].closed:
            connector = aiohttp.TCPConnector(limit=self.options.max_concurrency)
            state = (aiohttp.ClientSession(connector=connector), asyncio.Semaphore(self.options.max_concurrency))
            self._per_loop[loop] = state
        return state

    async def run_code(
        self, code: str, language: str = "python", stdin: str = "", timeout_s: float = 10.0, memory_limit_mb: int = -1
    ) -> ExecutionResult:
        """POST one `/run_code`; retries transport failures, raises SandboxFusionError when they run out."""
        session, semaphore = self._state()
        body = run_code_request(code, language, stdin, timeout_s, memory_limit_mb)
        timeout = aiohttp.ClientTimeout(total=timeout_s + self.options.slack_s, sock_connect=self.options.connect_timeout_s)
        opts, last_error = self.options, ""
        async with semaphore:
            for attempt in range(opts.retries + 1):
                if attempt:
                    self.retried += 1
                    await asyncio.sleep(min(opts.backoff_s * 2 ** (attempt - 1), opts.max_backoff_s))
                try:
                    async with session.post(self.endpoint, json=body, timeout=timeout) as response:
                        if response.status in _RETRY_HTTP:
                            last_error = f"HTTP {response.status}"
                            continue
                        if response.status != 200:  # a request the server refuses (422: a field it rejects)
                            text = " ".join((await response.text()).split())  # one line (an HTML error page too)
                            return ExecutionResult(RunStatus.ERROR, None, "", "", 0.0,
                                                   f"HTTP {response.status} from {self.endpoint}: {text:.{MAX_BODY_CHARS}}")
                        return parse_run_code_response(await response.json())
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                    last_error = f"{type(e).__name__}: {e}"
        raise SandboxFusionError(f"{self.endpoint}: no answer after {opts.retries + 1} attempts ({last_error})")

    async def close(self) -> None:
        """Close this loop's session (others close with their loops)."""
        state = self._per_loop.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state[0].close()
