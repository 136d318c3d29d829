"""Settings dataclasses are rebuilt from JSON and checkpoints strictly.

A run folder is data that may have been edited by hand, damaged or made by someone
else: an unknown key, a missing key or a value of the wrong type is one error
naming the file and the field, never a traceback later on.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, fields

from csnet.errors import CsnetError, UsageError

MAX_SEED = 2 ** 63 - 1  # torch's generators take 64-bit seeds; derived seeds are taken modulo this
_hints: dict[type, dict] = {}


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _fits(value, t) -> bool:
    """Does a JSON / checkpoint value fit the annotation ``t``? (The few types csnet's settings use.)"""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:  # JSON writes 1.0 as 1.0 but a hand edit may write 1; inf and NaN are never settings
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if t is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args else typing.Any
        return all(_fits(v, inner) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        k, v = args if args else (typing.Any, typing.Any)
        return all(_fits(a, k) and _fits(b, v) for a, b in value.items())
    return isinstance(value, t) if isinstance(t, type) else True


def from_dict(cls, d, what: str, source: str | None = None):
    """``cls(**d)`` after checking ``d``: a dict, no unknown keys, no missing required keys, every
    value of its field's type. ``source`` (a file) is named in the message; from a file, the
    dataclass's own checks are reported against that file too."""
    where = f"{source}: " if source else ""
    if not isinstance(d, dict):
        raise CsnetError(f"{where}{what} settings are not an object (found {type(d).__name__})")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise UsageError(f"{where}unknown {what} setting(s): {', '.join(sorted(unknown))}")
    if cls not in _hints:
        _hints[cls] = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in d:
            if f.default is MISSING and f.default_factory is MISSING:
                raise CsnetError(f"{where}{what} setting {f.name!r} is missing")
            continue
        t = _hints[cls][f.name]
        if not _fits(d[f.name], t):
            raise CsnetError(f"{where}{what} setting {f.name!r} should be {_type_name(t)}, found {d[f.name]!r}")
    try:
        return cls(**d)
    except CsnetError as e:
        if source is None:
            raise
        raise CsnetError(f"{source}: {e}") from e
