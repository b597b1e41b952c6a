"""Config loading: a dataclass schema, a YAML file on top, then `a.b=3` command-line overrides.

Reference: OmegaConf structured configs (https://omegaconf.readthedocs.io/en/2.3_branch/structured_config.html),
as Hydra and verl use them. The schema is a (nested) dataclass with defaults; `load_config` merges
YAML and dotlist overrides onto it and returns a plain instance of the schema class.

Errors are user errors, so they are `ValueError`s naming the key (and the file): an unknown key
(a typo in YAML or on the command line), a value of the wrong type, a required (`MISSING`) field
left unset. Simplification: no Hydra config groups/defaults lists, no interpolation resolvers
beyond OmegaConf's built-in `${a.b}`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf, StringNode
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

T = TypeVar("T")


def _first_line(e: OmegaConfBaseException) -> str:
    """OmegaConf's message without its appended full_key/object_type block."""
    return str(e).strip().splitlines()[0]


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    """Merge `other` onto the structured `base`, turning OmegaConf's errors into named ValueErrors."""
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ValueError(f"{source}: unknown config key '{e.full_key}' (not in the schema)") from None
    except ValidationError as e:
        raise ValueError(f"{source}: bad value for config key '{e.full_key}': {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ValueError(f"{source}: cannot merge config at key '{getattr(e, 'full_key', '?')}': {e}") from None
    except TypeError as e:  # OmegaConf's "Cannot merge incompatible container types" names no key
        raise ValueError(f"{source}: {e}: a list field given a mapping or the reverse (a list of tool entries is "
                         f"written [{{name: code_interpreter}}])") from None


def _parse_overrides(overrides: Sequence[str], schema: DictConfig) -> DictConfig:
    """Dotlist overrides (`a.b=3`, values parsed as YAML) into a config; a malformed item is a ValueError.

    A value that YAML reads as a mapping (text ending in ':' or holding ': ', e.g. `trainer.reward=file.py:`)
    given to a string field of `schema` is kept as the text typed, so the field's own check can say what is
    wrong with it (OmegaConf would reject it as "Cannot convert 'DictConfig' to string")."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.strip():
            raise ValueError(f"config override {item!r} must look like key.path=value")
    try:
        parsed = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ValueError(f"cannot parse config overrides {list(overrides)}: {e}") from None
    for item in overrides:
        key, text = item.split("=", 1)
        if isinstance(OmegaConf.select(parsed, key), DictConfig) and _is_string_field(schema, key):
            OmegaConf.update(parsed, key, text, merge=False)
    return parsed


def _is_string_field(schema: DictConfig, key: str) -> bool:
    """Whether the dotted `key` is a `str` (or Optional[str]) field of the structured config `schema`."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return False
    return isinstance(parent._get_node(leaf), StringNode)


def merge_config(schema_cls: type, yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The OmegaConf config of `schema_cls` defaults < YAML file < dotlist overrides, unresolved:
    required (`MISSING`) fields may still be unset (they print as `???`). ValueError as `load_config`."""
    if not dataclasses.is_dataclass(schema_cls):
        raise ValueError(f"schema_cls must be a dataclass, got {schema_cls!r}")
    cfg = OmegaConf.structured(schema_cls)
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as e:  # a syntax error: its position, not a parser traceback
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        cfg = _merge(cfg, loaded, str(path))
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides, cfg), "command-line override")
    return cfg


def load_config(schema_cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema_cls` instance: dataclass defaults < YAML file < dotlist overrides.

    Args:
        schema_cls: a dataclass (nested dataclasses allowed) giving keys, types and defaults.
        yaml_path: optional YAML file whose keys must all exist in the schema.
        overrides: strings like `"trainer.lr=1e-5"`, applied last.
    Returns:
        an instance of `schema_cls` (nested fields are instances of their dataclasses).
    Raises:
        ValueError naming the key (and file) for an unknown key, a wrong type, or a missing value.
    """
    cfg = merge_config(schema_cls, yaml_path, overrides)
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ValueError(f"required config key '{e.full_key}' has no value") from None
    except ValidationError as e:
        raise ValueError(f"bad value for config key '{e.full_key}': {_first_line(e)}") from None
    except ValueError as e:  # a section's own check (__post_init__) knows its class, not where it sits in the config
        key = _rejecting_section(cfg)
        raise ValueError(f"config key '{key}': {e}" if key else str(e)) from None


def _rejecting_section(cfg: DictConfig, prefix: str = "") -> str | None:
    """The dotted key of the innermost dataclass section of `cfg` whose construction raises ValueError, or None."""
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            inner = _rejecting_section(node, f"{prefix}{key}.")
            if inner is not None:
                return inner
            try:
                OmegaConf.to_object(node)
            except ValueError:
                return f"{prefix}{key}"
    return None


def to_yaml(cfg: Any) -> str:
    """The YAML text of a config (a dataclass instance or an OmegaConf config); loads back with `load_config`."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(cfg)


# ---------------------------------------------------------------------------------------------- reference
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its doc line} of a dataclass, read from the `# ...` comment ending each field's line
    (the one-line-doc-per-field convention of the config schemas); a subclass's line overrides its base's."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = textwrap.dedent(inspect.getsource(klass))
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        body = ast.parse(source).body[0].body
        docs.update({node.target.id: comments.get(node.end_lineno, comments.get(node.lineno, ""))
                     for node in body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)})
    return docs


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value == "???":  # omegaconf.MISSING
        return "required"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
        return "[" + ", ".join(str(v) for v in value) + "]"  # flow style: one table cell
    return OmegaConf.to_yaml({"v": value}).strip()[3:] if value is not None else "null"


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted key, dataclass) of every nested section of `cls`, depth first (rollout, rollout.engine, ...)."""
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            key = f"{prefix}.{f.name}" if prefix else f.name
            out += [(key, f.type), *_sections(f.type, key)]
    return out


def config_reference(schema_cls: type, title: str, intro: str = "") -> str:
    """Markdown reference of a nested config dataclass: one table per section (key, type, default, doc).

    Every leaf field must carry a doc comment (ValueError naming the field otherwise), so the reference
    is complete by construction. `docs/config.md` is this function's output for `TrainerConfig`."""
    lines = [f"# {title}", "", *([intro, ""] if intro else [])]
    top = [f for f in dataclasses.fields(schema_cls) if not dataclasses.is_dataclass(f.type)]
    sections = _sections(schema_cls, "")
    if top:
        sections.insert(0, ("", schema_cls))
    for prefix, cls in sections:
        docs = field_docs(cls)
        lines += [f"## `{prefix}`" if prefix else "## top level", ""]
        doc = inspect.getdoc(cls) or ""
        if doc and not doc.startswith(f"{cls.__name__}("):  # not the docstring dataclass() generates
            lines += [doc, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type):
                continue
            if not docs.get(f.name):
                raise ValueError(f"config field {cls.__name__}.{f.name} has no doc comment (`# ...` on its line)")
            key = f"{prefix}.{f.name}" if prefix else f.name
            default = _default_text(f).replace("|", "\\|")
            lines.append(f"| `{key}` | `{_type_name(f.type)}` | `{default}` | {docs[f.name].replace('|', chr(92) + '|')} |")
        lines.append("")
    return "\n".join(lines)

