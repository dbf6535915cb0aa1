"""YAML recipes -> typed dataclasses, with dotted overrides and errors that name file, key and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .files import dumps_json

__all__ = [
    "ConfigError",
    "positive",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "config_from_yaml",
    "save_config",
    "parse_overrides",
    "apply_overrides",
]

T = TypeVar("T")

POSITIVE = "positive"  # dataclass field metadata: ints must be >= 1, floats > 0 (each item of a tuple/list; None passes)


def positive(default: Any) -> Any:
    """A dataclass field whose value (or every item of it) must be >= 1 for ints and > 0 for floats, e.g.
    ``hidden: int = positive(128)``; checked when a config is built, so a zero-width model stops before any work."""
    return dataclasses.field(default=default, metadata={POSITIVE: True})


def _not_positive(value: Any) -> str | None:
    """Why ``value`` breaks a ``positive`` field, or None when it is fine."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if isinstance(item, int) and item < 1:
            return f"must be >= 1, got {value!r}"
        if isinstance(item, float) and not item > 0:
            return f"must be > 0, got {value!r}"
    return None


class ConfigError(ValueError):
    """A config file or override that does not fit its schema; `errors` holds (source, dotted key, message) triples."""

    def __init__(self, message: str, errors: Sequence[tuple[str, str, str]] = ()) -> None:
        super().__init__(message)
        self.errors: list[tuple[str, str, str]] = list(errors)


# --- YAML: a SafeLoader with YAML 1.2 scalars: `3e-4` is a float (not a string), `yes`/`off` stay strings (not
# bools), `010` stays a string (not octal 8), `2024-01-01` stays a string (not a date) --------------------------------

_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$")
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema booleans, integers and floats."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_FLOAT_TAG, _BOOL_TAG, _INT_TAG, _TIMESTAMP_TAG)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_INT_TAG, _INT_RE, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _load_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML text; return the data and a map dotted key -> 1-based line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is not None:
            _collect_lines(node, "", lines, source)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
    return data, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int], source: str) -> None:
    """Record the line of every mapping key; reject duplicate keys (PyYAML silently keeps the last)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"{source}:{line}: {key}: duplicate key (first defined on line {lines[key]})")
        lines[key] = line
        _collect_lines(value_node, key + ".", lines, source)


# --- type checking ------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """A short human name for a type annotation."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        if dataclasses.is_dataclass(tp):
            return f"a mapping ({tp.__name__})"
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin is list or origin is Sequence:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or origin is Mapping:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    return str(tp)


def _show(value: Any) -> str:
    """The type and a short repr of a value, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


class _Invalid(Exception):
    """Internal: value does not match the expected type."""


class _Validator:
    """Validates nested plain data against a dataclass schema, collecting every error."""

    def __init__(self, where: Callable[[str], str], blame: Callable[[str, str], str] | None = None) -> None:
        self.where = where
        self.blame = blame or (lambda key, _message: key)  # (section, message) -> the dotted key to report it at
        self.errors: list[tuple[str, str, str]] = []

    def fail(self, key: str, message: str) -> None:
        """Record one error at a dotted key."""
        self.errors.append((self.where(key), key, message))

    def dataclass_(self, schema: type, data: Any, key: str) -> Any:
        """Build a dataclass instance from a mapping."""
        if data is None and key == "":
            data = {}
        if not isinstance(data, Mapping):
            raise _Invalid(f"expected {_type_name(schema)}, got {_show(data)}")
        hints = _hints(schema)
        fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
        kwargs: dict[str, Any] = {}
        errors_before = len(self.errors)
        ok = True
        for name, value in data.items():
            sub = f"{key}.{name}" if key else str(name)
            if name not in fields:
                self.fail(sub, _unknown_key_message(str(name), key, list(fields)))
                ok = False
                continue
            try:
                kwargs[name] = self.value(hints[name], value, sub)
            except _Invalid as e:
                self.fail(sub, str(e))
                ok = False
                continue
            problem = _not_positive(kwargs[name]) if fields[name].metadata.get(POSITIVE) else None
            if problem is not None:
                self.fail(sub, problem)
                ok = False
        for name, f in fields.items():
            if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                sub = f"{key}.{name}" if key else name
                self.fail(sub, f"missing required key (expected {_type_name(hints[name])})")
                ok = False
        if not ok or len(self.errors) > errors_before:  # nested problems: do not build on placeholders
            return None
        try:
            return schema(**kwargs)
        except (TypeError, ValueError) as e:  # the section's own __post_init__ checks
            message = f"invalid {schema.__name__}: {e}"
            self.fail(self.blame(key, str(e)) if key else "<root>", message)
            return None

    def value(self, tp: Any, value: Any, key: str) -> Any:
        """Check and convert one value against a type annotation."""
        if tp is Any or tp is object:
            return value
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            members = [a for a in args if a is not type(None)]
            if len(members) == 1:  # Optional[X]: keep X's detailed (nested) errors
                try:
                    return self.value(members[0], value, key)
                except _Invalid:
                    raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}") from None
            for arg in members:
                try:
                    return _Validator(self.where, self.blame).value_strict(arg, value, key)
                except _Invalid:
                    continue
            raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}")
        if origin is Literal:
            for allowed in args:
                if value == allowed and type(value) is type(allowed):
                    return value
            raise _Invalid(f"expected one of {', '.join(repr(a) for a in args)}; got {_show(value)}")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if value is None:  # an empty section (`train:` with nothing below) means all defaults
                value = {}
            if not isinstance(value, Mapping):
                raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}")
            return self.dataclass_(tp, value, key)
        if origin is tuple or tp is tuple:
            if not isinstance(value, (list, tuple)):
                raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}")
            if not args:
                return tuple(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.item(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise _Invalid(f"expected {_type_name(tp)}, got {len(value)} items: {_show(value)}")
            return tuple(self.item(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        if origin in (list, Sequence) or tp is list:
            if not isinstance(value, (list, tuple)):
                raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}")
            item_tp = args[0] if args else Any
            return [self.item(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin in (dict, Mapping) or tp is dict:
            if not isinstance(value, Mapping):
                raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}")
            key_tp, val_tp = args if args else (Any, Any)
            out = {}
            for k, v in value.items():
                out[self.item(key_tp, k, f"{key}.{k}")] = self.item(val_tp, v, f"{key}.{k}")
            return out
        return self.scalar(tp, value)

    def value_strict(self, tp: Any, value: Any, key: str) -> Any:
        """Like value() but nested errors make the whole value invalid (for trying Union members)."""
        result = self.value(tp, value, key)
        if self.errors:
            raise _Invalid(self.errors[0][2])
        return result

    def item(self, tp: Any, value: Any, key: str) -> Any:
        """Validate a container element, reporting its own index/key."""
        try:
            return self.value(tp, value, key)
        except _Invalid as e:
            self.fail(key, str(e))
            return None

    @staticmethod
    def scalar(tp: Any, value: Any) -> Any:
        """Check a scalar: bool, int, float (accepts int), str, Path, Enum."""
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif tp is str:
            if isinstance(value, str):
                return value
        elif tp is type(None):
            if value is None:
                return None
        elif isinstance(tp, type) and issubclass(tp, Path):
            if isinstance(value, (str, Path)):
                return Path(value)
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            for member in tp:
                if value == member.value or value == member.name or value is member:
                    return member
            raise _Invalid(f"expected one of {', '.join(repr(m.value) for m in tp)}; got {_show(value)}")
        else:
            raise _Invalid(f"unsupported field type {tp!r} in the schema")
        raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}")


def _hints(schema: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (handles `from __future__ import annotations`)."""
    try:
        return typing.get_type_hints(schema)
    except Exception as e:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"cannot resolve the type hints of {schema.__name__}: {e}") from e


def _unknown_key_message(name: str, section: str, allowed: list[str]) -> str:
    """Message for an unknown key, listing the valid keys and the closest match."""
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"in '{section}'" if section else "at the top level"
    return f"unknown key{hint}; allowed keys {where}: {', '.join(sorted(allowed))}"


def _raise(errors: list[tuple[str, str, str]]) -> None:
    """Raise one ConfigError listing every collected error."""
    lines = [f"{src}: {key}: {msg}" if key else f"{src}: {msg}" for src, key, msg in errors]
    if len(lines) == 1:
        raise ConfigError(lines[0], errors)
    raise ConfigError(f"{len(lines)} config errors:\n  " + "\n  ".join(lines), errors)


def _build(schema: type[T], data: Any, where: Callable[[str], str],
           blame: Callable[[str, str], str] | None = None) -> T:
    """Validate `data` against `schema`, raising one ConfigError with every problem."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    v = _Validator(where, blame)
    try:
        result = v.dataclass_(schema, data, "")
    except _Invalid as e:
        v.fail("", f"the top level must be a mapping of sections ({e})")
        result = None
    if v.errors:
        _raise(v.errors)
    return typing.cast(T, result)


# --- public API ------------------------------------------------------------------------------------------------------


def config_from_dict(schema: type[T], d: Mapping[str, Any] | None, source: str = "<dict>") -> T:
    """Validate a plain nested dict against a dataclass schema; errors name `source` and the dotted key."""
    return _build(schema, d, lambda _key: source)


def config_to_dict(cfg: Any) -> Any:
    """A dataclass config as plain JSON/YAML-friendly data (tuples -> lists, Paths -> str, Enums -> values)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


def config_to_yaml(cfg: Any) -> str:
    """A dataclass config as YAML text (loads back to an equal config)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def config_from_yaml(schema: type[T], text: str, source: str = "<yaml>") -> T:
    """Parse YAML text against a schema (errors carry line numbers)."""
    data, lines = _load_yaml(text, source)
    return _build(schema, data, _file_where(source, lines))


def save_config(cfg: Any, path: Path) -> None:
    """Write a config as YAML (or JSON when the suffix is .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(dumps_json(config_to_dict(cfg), indent=2) + "\n")
    else:
        path.write_text(config_to_yaml(cfg))


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _split_overrides(overrides: Sequence[str]) -> list[tuple[str, str, Any]]:
    """Split `a.b=value` strings into (dotted key, raw text, YAML-parsed value)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise ConfigError(
                f"command-line override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4"
            )
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key, raw, value))
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parse `["train.lr=3e-4", "model.dims=[1,2]"]` into a nested dict; values are YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for key, _raw, value in _split_overrides(overrides):
        _set_dotted(nested, key, value)
    return nested


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set d[a][b][c] = value for key 'a.b.c', creating or replacing intermediate mappings."""
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[parts[-1]] = value


def _replace_at(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with the dotted `key` set to `value`: the sections on the way keep their other keys, the value
    itself replaces what was there (so `diffusion.schedule_args={}` clears the recipe's mapping)."""
    head, _, rest = key.partition(".")
    out = dict(base)
    if not rest:
        out[head] = value
    else:
        inner = out.get(head)
        out[head] = _replace_at(dict(inner) if isinstance(inner, Mapping) else {}, rest, value)
    return out


def _target_type(schema: type, key: str) -> Any:
    """The annotated type at a dotted key of a schema, or None when the key does not resolve."""
    tp: Any = schema
    for part in key.split("."):
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = members[0] if len(members) == 1 else None
            origin = typing.get_origin(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            tp = _hints(tp).get(part)
        elif origin in (dict, Mapping):
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        else:
            return None
        if tp is None:
            return None
    return tp


def _wants_str(tp: Any) -> bool:
    """True when a type accepts a string and no other scalar (so '001' or 'yes' stay text)."""
    if tp is str or (isinstance(tp, type) and issubclass(tp, Path)):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return bool(rest) and all(_wants_str(a) for a in rest)
    return False


def _file_where(source: str, lines: dict[str, int]) -> Callable[[str], str]:
    """Map a dotted key to 'file:line' using the nearest enclosing key that has a line."""

    def where(key: str) -> str:
        k = re.sub(r"\[\d+\]", "", key)
        while k:
            if k in lines:
                return f"{source}:{lines[k]}"
            k = k.rpartition(".")[0]
        return source

    return where


def apply_overrides(schema: type[T], data: Mapping[str, Any], overrides: Sequence[str], source: str = "<dict>") -> T:
    """Apply dotted overrides to plain config data and validate; errors name the override or `source`."""
    return _apply(schema, dict(data or {}), overrides, lambda _key: source)


def _apply(schema: type[T], data: dict[str, Any], overrides: Sequence[str], file_where: Callable[[str], str]) -> T:
    """Apply overrides to file data (each replaces the value at its key), validate once, and attribute each error to
    its origin: the command-line argument for what an override set, the file's line for the rest."""
    origins: dict[str, str] = {}
    for key, raw, value in _split_overrides(overrides):
        tp = _target_type(schema, key)
        if tp is not None and _wants_str(tp) and value is not None and not isinstance(value, str):
            value = raw.strip()  # `name=001` should stay the string '001' when the field is a str
        data = _replace_at(data, key, value)
        origins[key] = f"command-line override '{key}={raw}'"

    def where(key: str) -> str:
        k = re.sub(r"\[\d+\]", "", key)
        best = max((o for o in origins if k == o or k.startswith(o + ".")), key=len, default=None)
        return origins[best] if best is not None else file_where(key)

    def blame(section: str, message: str) -> str:
        """A section's own check failed: blame the override inside it whose field the message names, if any."""
        named = [o for o in origins if o.startswith(section + ".")
                 and re.search(rf"\b{re.escape(o.rpartition('.')[2])}\b", message)]
        return max(named, key=len) if named else section

    return _build(schema, data, where, blame)


def load_config(path: Path | str | None, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Load a YAML recipe into `schema`, apply dotted overrides; `path=None` starts from the schema's defaults."""
    if path is None:
        return _apply(schema, {}, overrides, lambda _key: "<defaults>")
    path = Path(path)
    source = str(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            options = sorted(p.name for p in path.parent.glob("*.y*ml"))
            if options:
                hint = f"; available in {path.parent}: {', '.join(options)}"
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {source}{hint}", [(source, "", what)])
    data, lines = _load_yaml(path.read_text(encoding="utf-8"), source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {_show(data)}")
    return _apply(schema, data, overrides, _file_where(source, lines))
