"""`verl-mega sandbox serve --host 127.0.0.1 --port 8080`: the local sandbox over SandboxFusion's `run_code` API.

Training ranks (or nodes) point `SandboxFusionTool(sandbox_fusion_url="http://HOST:PORT")` at it. The
limits given here are the most any request gets; see verl_mega/tools/sandbox.py for the guarantees.
"""

from __future__ import annotations

import argparse
import sys

from verl_mega.tools.sandbox import Sandbox, SandboxLimits

_DEFAULT = SandboxLimits()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verl-mega sandbox", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="serve SandboxFusion's POST /run_code over the local bubblewrap sandbox")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--max-concurrency", type=int, default=8, help="programs running at once; more requests queue")
    serve.add_argument("--timeout-s", type=float, default=_DEFAULT.timeout_s, help="largest wall-clock limit of a run")
    serve.add_argument("--memory-mb", type=int, default=_DEFAULT.memory_mb, help="largest memory limit of a run")
    serve.add_argument("--max-processes", type=int, default=_DEFAULT.max_processes)
    serve.add_argument("--max-output-bytes", type=int, default=_DEFAULT.max_output_bytes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `verl-mega sandbox`; returns the exit status (2: a bad flag, no usable sandbox, or an
    address that cannot be bound; one error line naming the flag, no traceback)."""
    args = _parser().parse_args(argv)
    from verl_mega.tools.sandbox import SandboxUnavailable
    from verl_mega.tools.server import serve  # aiohttp is needed only here

    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        for name in ("max_concurrency", "timeout_s", "memory_mb", "max_processes", "max_output_bytes"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
        limits = SandboxLimits(timeout_s=args.timeout_s, memory_mb=args.memory_mb, max_processes=args.max_processes,
                               max_output_bytes=args.max_output_bytes)
        sandbox = Sandbox(limits)
    except (ValueError, SandboxUnavailable) as exc:
        print(f"verl-mega sandbox serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        serve(sandbox, args.host, args.port, args.max_concurrency)
    except OSError as exc:  # address in use, not an address of this machine, unknown host name
        print(f"verl-mega sandbox serve: error: cannot listen on --host {args.host} --port {args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
