"""SandboxFusion's `POST /run_code` served over the local bubblewrap sandbox (aiohttp), so many ranks can share a host.

One process, one event loop: each request runs one `Sandbox.run` (a `bwrap` child process; the loop
only waits on pipes), at most `max_concurrency` at once; later requests queue on a semaphore. The
server's `SandboxLimits` are upper bounds: a request may ask for a shorter `run_timeout` or a smaller
`memory_limit_MB`, never more. `GET /health` answers "ok" once the server is up.

There is no authentication (SandboxFusion has none either): whoever reaches the port can run code in
the sandbox, so bind it to localhost or a private network.

A malformed request gets HTTP 422 with a `SandboxError` body naming the field (FastAPI's status for a
validation error, which is what SandboxFusion answers).
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from verl_mega.tools.fusion_api import error_response, limits_from_request, run_code_response
from verl_mega.tools.sandbox import Sandbox

MAX_REQUEST_BYTES = 16 << 20  # the largest request body (program + stdin) accepted


def make_app(sandbox: Sandbox, max_concurrency: int) -> web.Application:
    """The aiohttp application: POST /run_code, GET /health."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    slots = asyncio.Semaphore(max_concurrency)

    async def run_code(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
            limits = limits_from_request(body, sandbox.limits)
        except (ValueError, json.JSONDecodeError) as e:
            return web.json_response(error_response(str(e)), status=422)
        async with slots:
            result = await sandbox.run(body["code"], body.get("stdin") or "", limits)
        return web.json_response(run_code_response(result))

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.add_routes([web.post("/run_code", run_code), web.get("/health", health)])
    return app


def serve(sandbox: Sandbox, host: str, port: int, max_concurrency: int) -> None:
    """Serve until interrupted (SIGINT/SIGTERM)."""
    web.run_app(make_app(sandbox, max_concurrency), host=host, port=port, print=lambda msg: print(msg, flush=True))
