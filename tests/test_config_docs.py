"""docs/config.md is the generated reference of TrainerConfig and is up to date; every field has a doc line;
`verl-mega train --print-config` works without the required paths."""

import os
from dataclasses import dataclass

import pytest

from verl_mega.apps import config_docs, train_cli
from verl_mega.config import config_reference, field_docs


def test_committed_config_docs_are_up_to_date():
    with open(config_docs.DOCS_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == config_docs.render(), "run: python -m verl_mega.apps.config_docs"
    assert "| `trainer.reward_fail_steps` | `int` | `3` |" in committed and "| `model.path` | `str` | `required` |" in committed


@dataclass
class _Section:
    lr: float = 1e-6  # learning rate
    name: str = "x"


@dataclass
class _Schema:
    opt: _Section = None


def test_undocumented_field_is_an_error():
    assert field_docs(_Section) == {"lr": "learning rate", "name": ""}
    with pytest.raises(ValueError, match="_Section.name has no doc comment"):
        config_reference(_Schema, "t")


def test_print_config_without_paths(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_cli.parse_config(["--print-config", "parallel.tp=2"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "path: ???" in out and "tp: 2" in out
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 3.0e-07\n")
    with pytest.raises(SystemExit):
        train_cli.parse_config([str(y), "--print-config"])
    assert "lr: 3.0e-07" in capsys.readouterr().out
    assert train_cli.main(["--print-config", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert os.path.basename(config_docs.DOCS_PATH) == "config.md"
