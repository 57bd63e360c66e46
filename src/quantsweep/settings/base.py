"""What every settings object can do: be built from a config mapping or its JSON (checked, one
line naming the key on a bad value), say which of its values differ from the defaults, and
cross a rule as that JSON.

A settings class is a frozen dataclass whose field defaults are *the* defaults (the workflow's
schema repeats them for its documentation; a test holds the two equal). Field types say what a
value may be (whole numbers, numbers, strings, lists of strings, nested settings, ...); a
field's metadata adds a bound (`minimum`, `positive`), a set of `choices` or its own `parse`
and `dump` for a shape the types do not say; `check` adds what spans several fields.

A rule gets `to_json()`: only the values that differ from the defaults, so a sweep without
the section gives `{}`, and a setting a step does not read (`omit`) cannot rerun it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, QuantsweepError

S = TypeVar("S", bound="Settings")


def read_json_arg(value: str, what: str) -> Any:
    """A JSON argument given inline or as a .json file (`what`: the option, for the message)."""
    try:
        text = Path(value).read_text(encoding="utf-8") if value.endswith(".json") else value
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise QuantsweepError(f"{what}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


class Settings:
    """Mixin of the settings dataclasses (see the module docstring)."""

    SECTION = ""  # where its values sit in the config: how messages name them unless told

    @classmethod
    def from_dict(cls: type[S], d: Mapping | None, where: str = "") -> S:
        """From a config mapping or its JSON form (missing keys: the defaults); ConfigError
        naming `where`.key (default: the class's config section) for an unknown key or a bad value."""
        where = where or cls.SECTION or cls.__name__
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: {d!r} is not a mapping")
        fs = {f.name: f for f in dataclasses.fields(cls) if f.init}
        if unknown := sorted(set(d) - set(fs), key=str):
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fs))})")
        hints = _hints(cls)
        values = {k: _parse(hints[k], v, f"{where}.{k}", fs[k].metadata) for k, v in d.items()}
        obj = cls(**values)
        obj.check(where)
        return obj

    @classmethod
    def from_json(cls: type[S], value: str, where: str = "") -> S:
        """From a JSON argument (inline or a .json file), as from_dict."""
        where = where or cls.SECTION or cls.__name__
        return cls.from_dict(read_json_arg(value, where), where)

    def check(self, where: str) -> None:
        """What spans several fields (ConfigError naming the key); none by default."""

    def to_dict(self) -> dict:
        """Every value, in the config's form (lists, mappings)."""
        return {f.name: _dump(getattr(self, f.name), f.metadata) for f in _own(self)}

    def changed(self, omit: Iterable[str] = (), only: Iterable[str] | None = None) -> dict:
        """Only the values that differ from the defaults (nested settings: their changed values),
        without the fields in `omit` or not in `only`: {} is exactly the defaults."""
        out = {}
        skip, keep = set(omit), None if only is None else set(only)
        for f in _own(self):
            if f.name in skip or (keep is not None and f.name not in keep):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Settings):
                if sub := value.changed():
                    out[f.name] = sub
            elif _dump(value, f.metadata) != _dump(_default(f), f.metadata):
                out[f.name] = _compact(value, f.metadata)
        return out

    def to_json(self, omit: Iterable[str] = (), only: Iterable[str] | None = None) -> str:
        """What crosses a rule: the changed values as JSON (keys sorted, so equal settings give
        equal text and an unchanged setting reruns nothing); `omit`/`only`: the fields a step
        does not read / the only ones it reads, so that no other setting reruns it."""
        return json.dumps(self.changed(omit, only), sort_keys=True)

    def updated(self: S, values: Mapping[str, Any], where: str = "") -> S:
        """These settings with `values` put over them (None: left as it is), checked as from_dict
        checks: how a hand flag overrides what --settings gave."""
        given = {k: v for k, v in values.items() if v is not None}
        return self if not given else type(self).from_dict({**self.to_dict(), **given}, where)


def _own(obj) -> list[dataclasses.Field]:
    """The fields that are settings of their own (not an older spelling folded into another:
    those take no part in equality)."""
    return [f for f in dataclasses.fields(obj) if f.init and f.compare]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dump(value: Any, meta: Mapping) -> Any:
    if "dump" in meta:
        return meta["dump"](value)
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_dump(v, {}) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v, {}) for k, v in value.items()}
    return value


def _compact(value: Any, meta: Mapping) -> Any:
    """As _dump, but settings inside a list give only their changed values (a budget: its limit)."""
    if "dump" not in meta and isinstance(value, tuple) and any(isinstance(v, Settings) for v in value):
        return [v.changed() if isinstance(v, Settings) else _dump(v, {}) for v in value]
    return _dump(value, meta)


def whole(v: Any) -> bool:
    """A whole number (True is not one, though Python says it is an int)."""
    return isinstance(v, int) and not isinstance(v, bool)


def number(v: Any) -> bool:
    """A finite number (not a bool)."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _parse(tp: Any, v: Any, where: str, meta: Mapping) -> Any:
    """`v` as a value of type `tp`, or ConfigError naming `where`."""
    if "parse" in meta:
        return meta["parse"](v, where)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: {v!r} is not true or false")
        return v
    if tp is int:
        low = meta.get("minimum")
        if not whole(v) or (low is not None and v < low):
            raise ConfigError(f"{where}: {v!r} is not a whole number" + (f" >= {low}" if low is not None else ""))
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, meta['choices']))}")
        return v
    if tp is float:
        if not number(v) or (meta.get("positive") and v <= 0):
            raise ConfigError(f"{where}: {v!r} is not a {'positive ' if meta.get('positive') else ''}number")
        return v
    if tp is str:
        if not isinstance(v, str) or (meta.get("nonempty") and not v):
            raise ConfigError(f"{where}: {v!r} is not a {'non-empty ' if meta.get('nonempty') else ''}string")
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(meta['choices'])}")
        return v
    if isinstance(tp, type) and issubclass(tp, Settings):
        return v if isinstance(v, tp) else tp.from_dict(v, where)
    if typing.get_origin(tp) is tuple:
        return _parse_list(args[0], v, where, meta)
    if typing.get_origin(tp) is dict:
        if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) and k and x
                                                 for k, x in v.items()):
            raise ConfigError(f"{where}: {v!r} is not a mapping of non-empty strings")
        return dict(v)
    raise TypeError(f"{where}: no parser for {tp!r}")  # a settings class declared a type this module lacks


def _parse_list(item: Any, v: Any, where: str, meta: Mapping) -> tuple:
    if isinstance(item, type) and issubclass(item, Settings):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: {v!r} is not a list")
        return tuple(x if isinstance(x, item) else item.from_dict(x, f"{where}[{i}]") for i, x in enumerate(v))
    if item is str:
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
            raise ConfigError(f"{where}: {v!r} is not a list of non-empty strings")
        return tuple(v)
    if item is int:
        low = meta.get("minimum")
        if not isinstance(v, (list, tuple)) or not all(whole(x) and (low is None or x >= low) for x in v):
            raise ConfigError(f"{where}: {v!r} is not a list of whole numbers" + (f" >= {low}" if low is not None
                                                                                  else ""))
        return tuple(v)
    raise TypeError(f"{where}: no parser for lists of {item!r}")


def field(default: Any = dataclasses.MISSING, *, factory: Callable | None = None, **meta: Any) -> Any:
    """A dataclass field with checks in its metadata (minimum, positive, nonempty, choices, parse, dump)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
