"""`verl-mega` command line: one entry point, each subcommand implemented beside its subsystem.

    verl-mega demo      CPU demo: supervise a tiny model, then GRPO; shows accuracy before/after
    verl-mega train     RL training from a YAML config plus dotted overrides
    verl-mega generate  batched generation from a Hugging Face directory
    verl-mega export    distributed checkpoint -> Hugging Face directory
    verl-mega sandbox   `sandbox serve`: the code sandbox over SandboxFusion's HTTP API
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("verl_mega.apps.demo", "CPU demo: SFT a tiny model, then GRPO; prints accuracy before/after"),
    "train": ("verl_mega.apps.train_cli", "RL training from CONFIG.yaml [key=value ...]"),
    "generate": ("verl_mega.apps.generate_cli", "generate responses for a .jsonl / .parquet of prompts"),
    "export": ("verl_mega.apps.export_cli", "export a checkpoint to a Hugging Face directory"),
    "sandbox": ("verl_mega.apps.sandbox_serve", "sandbox serve --host H --port N: the code sandbox over SandboxFusion's HTTP API"),
}


def _usage() -> str:
    lines = ["usage: verl-mega {" + ",".join(SUBCOMMANDS) + "} [args...]   (verl-mega COMMAND --help; --version)", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a missing command is a usage error (argparse's convention: exit 2)
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"verl-mega {version('verl_mega')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"verl-mega: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    import torch.distributed as dist

    from verl_mega.parallel.dist import shutdown_distributed  # after the subcommand: torch is imported by now

    # whoever creates the process group destroys it: a caller that already had one (a script or test calling
    # main() in-process) keeps it; one the subcommand created is shut down here so the process exits cleanly
    owned = not (dist.is_available() and dist.is_initialized())
    try:
        status = int(module.main(rest) or 0)
    except BaseException:
        if owned:
            shutdown_distributed(barrier=False)  # peers may never reach a barrier; the traceback follows
        raise
    if owned:
        shutdown_distributed(barrier=True)  # every rank done before any group goes away (clean exit, status kept)
    return status


if __name__ == "__main__":
    sys.exit(main())
