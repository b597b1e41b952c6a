"""load_config: defaults, YAML, overrides, nested dataclasses; unknown keys and wrong types named."""

from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING

from verl_mega.config import load_config, to_yaml


@dataclass
class Optim:
    lr: float = 1e-6  # learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Schema:
    name: str = "run"
    steps: int = 10
    use_kl: bool = False
    optim: Optim = field(default_factory=Optim)


@dataclass
class Required:
    model_path: str = MISSING


def test_defaults_yaml_overrides(tmp_path):
    assert load_config(Schema) == Schema()
    y = tmp_path / "c.yaml"
    y.write_text("steps: 20\noptim:\n  lr: 3.0e-5\n")
    cfg = load_config(Schema, y, ["optim.betas=[0.5,0.6]", "steps=30", "use_kl=true"])
    assert isinstance(cfg, Schema) and isinstance(cfg.optim, Optim)
    assert cfg.steps == 30 and cfg.use_kl is True and cfg.name == "run"
    assert cfg.optim.lr == pytest.approx(3e-5) and cfg.optim.betas == [0.5, 0.6]


def test_roundtrip_yaml(tmp_path):
    cfg = load_config(Schema, overrides=["name=x", "optim.lr=0.5"])
    y = tmp_path / "dump.yaml"
    y.write_text(to_yaml(cfg))
    assert load_config(Schema, y) == cfg


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  lrr: 1.0\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*optim\.lrr"):
        load_config(Schema, y)


def test_unknown_key_in_override_named():
    with pytest.raises(ValueError, match=r"unknown config key 'stepz'"):
        load_config(Schema, overrides=["stepz=3"])


def test_wrong_type_named():
    with pytest.raises(ValueError, match=r"'steps'.*abc|abc.*'steps'|steps"):
        load_config(Schema, overrides=["steps=abc"])
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(Schema, overrides=["optim.lr=fast"])


def test_malformed_override_and_missing_value(tmp_path):
    with pytest.raises(ValueError, match="key.path=value"):
        load_config(Schema, overrides=["steps"])
    with pytest.raises(ValueError, match="model_path"):
        load_config(Required)
    assert load_config(Required, overrides=["model_path=/m"]).model_path == "/m"
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Schema, tmp_path / "nope.yaml")


def test_override_text_yaml_reads_as_a_mapping_stays_text_for_a_string_field():
    # YAML reads "file.py:" as {"file.py": None}; a str field keeps the text typed (its own check judges it)
    assert load_config(Schema, overrides=["name=file.py:"]).name == "file.py:"
    assert load_config(Schema, overrides=["name=mod: fn"]).name == "mod: fn"
    with pytest.raises(ValueError, match="'steps'"):  # a non-string field still rejects the mapping
        load_config(Schema, overrides=["steps=a:"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    y = tmp_path / "broken.yaml"
    y.write_text("model:\n  path: [\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: not valid YAML.*line 3"):
        load_config(Schema, y)


@dataclass
class Checked:
    lr: float = 1.0  # must be positive

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"Checked.lr must be positive, got {self.lr}")


@dataclass
class Nested:
    inner: Schema = field(default_factory=Schema)
    actor_optim: Checked = field(default_factory=Checked)
    critic_optim: Checked = field(default_factory=Checked)


def test_section_check_names_its_config_key():
    """A section's own __post_init__ check names its class; load_config says which key holds it."""
    with pytest.raises(ValueError, match=r"^config key 'critic_optim': Checked\.lr must be positive, got -1\.0$"):
        load_config(Nested, overrides=["critic_optim.lr=-1"])


def test_mapping_given_to_a_list_field_is_a_value_error():
    """rollout.tools={name: code_interpreter} (a mapping for a list) was a TypeError traceback from OmegaConf."""
    from verl_mega.trainer.config import TrainerConfig

    with pytest.raises(ValueError, match=r"command-line override: Cannot merge incompatible container types: a list field "
                                         r"given a mapping or the reverse"):
        load_config(TrainerConfig, None, ["rollout.tools={name: code_interpreter}"])
