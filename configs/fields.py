"""The one helper every config section uses to declare a field with its help and rules."""

from __future__ import annotations

from dataclasses import field


def _f(default, *, help: str, **rules):
    """A dataclass field with a default, a help line and validation rules."""
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata={"help": help, **rules})
