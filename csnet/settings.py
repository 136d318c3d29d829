"""Settings dataclasses are rebuilt from JSON and checkpoints strictly: an unknown key is an error."""

from __future__ import annotations

from dataclasses import fields

from csnet.errors import UsageError


def from_dict(cls, d: dict, what: str):
    """``cls(**d)``, refusing keys that ``cls`` does not declare (a typo or a newer csnet's file)."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise UsageError(f"unknown {what} setting(s): {', '.join(sorted(unknown))}")
    return cls(**d)
