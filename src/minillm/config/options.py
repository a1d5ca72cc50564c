"""The mechanics of every config: fields with help, key resolution, type conversion, ranges, YAML in and out.

A field's `metadata["help"]` is its documentation (what `minillm <command> --help` prints); `choices`,
`min` and `max` are checked. A field whose type is itself a dataclass (`sampling: SamplingConfig`) is a
nested group: its options are set as `sampling.temperature=1.2` (dotted), as a `sampling:` mapping in
YAML, or by the flat name alone (`temperature=1.2`), which is how the options were named before the group
existed. Values come, in increasing priority, from the defaults, a YAML file and the overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from ..errors import ConfigError
from ..io import write_text

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def option(default, help: str, **kw):  # noqa: A002 - "help" reads best here
    """A dataclass field with its help text (and optional `choices`, `min`, `max`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def group(cls, help: str):  # noqa: A002
    """A nested group of options (a dataclass): `sampling: SamplingConfig = group(SamplingConfig, "...")`."""
    return field(default_factory=cls, metadata={"help": help})


class Options:
    """Base of the command configs: keywords are checked on construction, as keys are by `build_config`.

    `refused` names the options of a nested group that the command does not take ("sampling.greedy"),
    each with the reason given to the user.
    """

    refused: ClassVar[dict[str, str]] = {}

    def __new__(cls, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)]
        cls = cls.class_for({**dict(zip(names, args)), **kwargs})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key in known:
                continue
            path = nested_names(cls).get(key)
            if path:
                head, name = path.split(".")
                raise ConfigError(f"{cls.__name__}(...): `{key}` is an option of the `{head}` group: pass "
                                  f"{head}={nested_groups(cls)[head].__name__}({name}=...) (build_config "
                                  f"also takes `{key}`).")
            raise unknown_key_error(cls, key, f"{cls.__name__}(...)")
        return super().__new__(cls)

    @classmethod
    def class_for(cls, values: dict[str, Any]) -> type:
        """The class that configures `values` (a family of configs picks one by a key, e.g. `method`)."""
        return cls

    @classmethod
    def related(cls) -> list[type]:
        """Sibling configs whose options are named when a key belongs to one of them instead."""
        return []

    @classmethod
    def label(cls) -> str:
        return cls.__name__

    def validate(self) -> None:
        check_finite_fields(self, self.label())
        for path, reason in self.refused.items():
            head, name = path.split(".")
            sub = getattr(self, head)
            if getattr(sub, name) != getattr(type(sub)(), name):
                raise ConfigError(f"`{path}` does not apply to {self.label()}: {reason}")


def check_finite_fields(cfg, where: str) -> None:
    """Refuse NaN / +-inf in any option of `cfg` or of its nested groups (also on direct construction)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for sub in dataclasses.fields(value):
                _check_finite(getattr(value, sub.name), where, f"{f.name}.{sub.name}")
        else:
            _check_finite(value, where, f.name)


def nested_groups(cls) -> dict[str, type]:
    """Nested groups of `cls`: field name -> dataclass type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def nested_names(cls) -> dict[str, str]:
    """Every accepted spelling of a nested option -> its dotted name: `sampling.top_k` and `top_k`."""
    top = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for head, sub in nested_groups(cls).items():
        for f in dataclasses.fields(sub):
            path = f"{head}.{f.name}"
            out[path] = path
            if f.name not in top:
                out.setdefault(f.name, path)
    return out


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is Literal:
        return str
    return origin or tp


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE or s in _FALSE:
        return s in _TRUE
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _to_list(value: Any) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            return list(yaml.safe_load(s))
        items = [v.strip() for v in s.split(",") if v.strip()]
        return [yaml.safe_load(v) if v.lstrip("-").isdigit() else v for v in items]
    return [value]


def _to_str(value: Any) -> str:
    if isinstance(value, (dict, list, bool)):  # a bool: YAML's unquoted yes/no/on/off/true/false
        raise ValueError
    return "" if value is None else str(value)


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, list: _to_list, str: _to_str}


def _convert(cls, f: dataclasses.Field, value: Any, where: str, name: str):
    tp = _base_type(typing.get_type_hints(cls)[f.name])
    try:
        return _CONVERTERS[tp](value) if tp in _CONVERTERS else value
    except (TypeError, ValueError, OverflowError):  # OverflowError: int("1e999"), int(inf)
        hint = (" YAML reads an unquoted yes / no / on / off / true / false as a boolean: quote the value."
                if isinstance(value, bool) and tp is str else "")
        raise ConfigError(f"{where}: `{name}` expects {tp.__name__}, got {value!r}.{hint}") from None


def _non_finite(value: Any) -> bool:
    """A float NaN or +-inf, alone or inside a list (a range check lets NaN through: `nan < 0` is False)."""
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def _check_finite(value: Any, where: str, name: str) -> None:
    if _non_finite(value):
        raise ConfigError(f"{where}: `{name}` must be a finite number; got {value!r}. NaN and infinity are "
                          f"not valid option values: set {name}=<a finite number>.")


def _check_range(f: dataclasses.Field, value: Any, where: str, name: str | None = None) -> None:
    md, name = f.metadata, name or f.name
    _check_finite(value, where, name)
    if "choices" in md and value not in md["choices"]:
        hint = difflib.get_close_matches(str(value), [str(c) for c in md["choices"]], n=1)
        extra = f" Did you mean '{hint[0]}'?" if hint else ""
        choices = ", ".join(md["choices"])
        raise ConfigError(f"{where}: `{name}` must be one of {choices}; got {value!r}.{extra}")
    if "min" in md and value < md["min"]:
        raise ConfigError(f"{where}: `{name}` must be >= {md['min']}; got {value!r}.")
    if "max" in md and value > md["max"]:
        raise ConfigError(f"{where}: `{name}` must be <= {md['max']}; got {value!r}.")


def _checked(cls, f: dataclasses.Field, value: Any, where: str, name: str | None = None):
    value = _convert(cls, f, value, where, name or f.name)
    _check_range(f, value, where, name)
    return value


def _own_names(cls) -> dict[str, str]:
    """Spelling -> canonical name of every option of `cls` (fields, dotted and flat nested options)."""
    return {**{f.name: f.name for f in dataclasses.fields(cls) if f.name not in nested_groups(cls)},
            **nested_names(cls)}


def unknown_key_error(cls, key: str, where: str) -> ConfigError:
    owners = [c.label() for c in cls.related() if key in _own_names(c)]
    if owners:
        return ConfigError(f"{where}: option `{key}` does not apply to {cls.label()}; it is an option of "
                           f"{' and '.join(owners)}.")
    names = _own_names(cls)
    foreign = {n: c for c in cls.related() for n in _own_names(c) if n not in names}
    hint = difflib.get_close_matches(key, [*names, *foreign], n=1, cutoff=0.5)
    msg = f"{where}: unknown option `{key}` for `{cls.__name__}`."
    if hint and hint[0] in names:
        msg += f" Did you mean `{names[hint[0]]}`?"
    elif hint:
        msg += f" Did you mean `{hint[0]}` (an option of {foreign[hint[0]].label()})?"
    else:
        msg += " Run the command with --help to list the options."
    return ConfigError(msg)


def read_yaml(yaml_path: str) -> dict:
    """The top-level mapping of a YAML config file (errors name the file and line)."""
    path = Path(yaml_path)
    if path.is_dir():
        raise ConfigError(f"config file {yaml_path} is a folder; pass a YAML file (--config FILE.yaml).")
    if not path.is_file():
        raise ConfigError(f"config file {yaml_path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{yaml_path}:{line}: not a UTF-8 text file ({e.reason} at byte {e.start}); "
                          "save the config as UTF-8.") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {yaml_path}: {e.strerror or e}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{yaml_path}{line}: invalid YAML ({getattr(e, 'problem', e)}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{yaml_path}: expected a mapping of option: value at the top level.")
    return data


def _collect(yaml_path: str | None, overrides: dict[str, Any] | list[str] | None,
             groups: typing.Iterable[str]) -> dict[str, tuple[Any, str]]:
    """key -> (raw value, where it came from), in increasing priority; a nested mapping given for a group
    (`sampling: {temperature: 1.2}`) becomes its dotted keys."""
    sources: list[tuple[dict, str]] = []
    if yaml_path:
        sources.append((read_yaml(yaml_path), yaml_path))
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"command line: expected key=value, got {item!r}.")
            k, v = item.split("=", 1)
            parsed[k.strip().lstrip("-")] = v
        overrides = parsed
    sources.append((overrides or {}, "command line"))
    values: dict[str, tuple[Any, str]] = {}
    for data, where in sources:
        for k, v in data.items():
            k = str(k).replace("-", "_")
            nested = k in groups and isinstance(v, dict)
            items = {f"{k}.{sk}": sv for sk, sv in v.items()} if nested else {k: v}
            for key, value in items.items():
                key = key.replace("-", "_")
                values.pop(key, None)  # a later source comes later, so it wins over every spelling
                values[key] = (value, where)
    return values


def _resolve_nested(cls, head: str, sub_cls, given: dict[str, tuple[Any, str]], base=None):
    """Build the nested group `head` from its given options (over `base`, when a group instance was given)."""
    fields = {f.name: f for f in dataclasses.fields(sub_cls)}
    kwargs = {name: _checked(sub_cls, fields[name], v, where, f"{head}.{name}")
              for name, (v, where) in given.items()}
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else sub_cls(**kwargs)
    except ConfigError as e:
        wheres = sorted({where for _, where in given.values()})
        raise ConfigError(f"{' / '.join(wheres)}: {e}" if wheres else str(e)) from None


def build_config(cls, yaml_path: str | None = None, overrides: dict[str, Any] | list[str] | None = None):
    """Resolve a config: dataclass defaults < YAML file < overrides (dict or `key=value` strings).

    A family of configs picks its class from the values: `build_config(TrainConfig, ...)` returns the
    config class of `method` (see `config_class`).
    """
    values = _collect(yaml_path, overrides, nested_groups(cls))
    cls = cls.class_for({k: v for k, (v, _) in values.items()}) if issubclass(cls, Options) else cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    groups = nested_groups(cls)
    spellings = nested_names(cls)
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, tuple[Any, str]]] = {head: {} for head in groups}
    for k, (v, where) in values.items():
        if k in groups and isinstance(v, groups[k]):
            kwargs[k] = v  # a group instance, e.g. sampling=SamplingConfig(...)
        elif k in fields and k not in groups:
            kwargs[k] = _checked(cls, fields[k], v, where)
        elif k in spellings:
            path = spellings[k]
            if path in getattr(cls, "refused", {}):
                raise ConfigError(f"{where}: `{k}` does not apply to {cls.label()}: {cls.refused[path]}")
            head, name = path.split(".")
            nested[head][name] = (v, where)
        else:
            raise unknown_key_error(cls, k, where)
    for head, given in nested.items():
        if given:
            kwargs[head] = _resolve_nested(cls, head, groups[head], given, kwargs.get(head))
    cfg = cls(**kwargs)
    for f in dataclasses.fields(cls):  # defaults must satisfy the ranges too
        if f.name not in kwargs and f.name not in groups:
            _check_range(f, getattr(cfg, f.name), "default")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict[str, Any]:
    """The config as plain data: nested groups as mappings, without the options the command refuses."""
    data = dataclasses.asdict(cfg)
    for path in getattr(cfg, "refused", {}):
        head, name = path.split(".")
        data[head].pop(name, None)
    return data


def save_config(cfg, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config (atomically) so every output records how it was produced."""
    return write_text(Path(out_dir) / name, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
