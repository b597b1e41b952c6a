"""`verl-mega` itself: usage, an unknown command, --version (the first things a new user types)."""

from importlib.metadata import version

from verl_mega.apps.cli import main


def test_usage_unknown_command_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "generate responses for a .jsonl / .parquet of prompts" in out and "COMMAND --help" in out
    assert main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"verl-mega {version('verl_mega')}"
