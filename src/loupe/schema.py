"""One validation layer for every dataclass read from a file or a command line.

A config dataclass declares its schema in its annotations (the types) and, where a value
must lie in a range, in `field(metadata=at_least(1))`-style metadata. `check(obj, where)`
checks every field against both and raises a `ConfigError` naming the file (`where`), the
field and the value:

    text_config.hidden_size='4096' in m/config.json: expected an integer

Types are checked strictly (a bool is not an int, "no" is not a bool, 1.5 is not an int,
NaN and infinities are no float); an int is accepted where a float is declared. Unions,
Optional, list[...], tuple[...] and nested dataclasses are followed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache
from typing import Any, Union

from loupe.errors import ConfigError

RANGE = "loupe_range"  # metadata key: (low, high, low_inclusive)


def at_least(low: float) -> dict[str, Any]:
    return {RANGE: (low, math.inf, True)}


def above(low: float) -> dict[str, Any]:
    return {RANGE: (low, math.inf, False)}


def between(low: float, high: float) -> dict[str, Any]:
    return {RANGE: (low, high, True)}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return "an object"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    if typing.get_origin(hint) in (list, tuple):
        return f"lists of {_plural(typing.get_args(hint)[0])}"
    return {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}.get(hint, _describe(hint))


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of the declared type `hint` (strict: see the module's docstring)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.ClassVar:
        return True
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check(obj: Any, where: str = "", prefix: str = "") -> None:
    """Check every field of the dataclass `obj` against its declared type and range; errors
    name the field as `prefix + name` and the file or option set as `where`."""
    at = f" in {where}" if where else ""
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), _hints(type(obj))[f.name]
        name = prefix + f.name
        if not fits(value, hint):
            raise ConfigError(f"{name}={value!r}{at}: expected {_describe(hint)}")
        bounds = f.metadata.get(RANGE)
        if bounds is not None and isinstance(value, int | float) and not isinstance(value, bool):
            low, high, inclusive = bounds
            if not ((value >= low if inclusive else value > low) and value <= high):
                rule = (f"at least {low:g}" if inclusive else f"above {low:g}") if high == math.inf else \
                    f"between {low:g} and {high:g}"
                raise ConfigError(f"{name}={value!r}{at}: must be {rule}")


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """`cls(**values)` with unknown or missing fields named, and `where` in any error."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; it has {sorted(names)}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {where})" if where not in str(e) else str(e)) from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None
