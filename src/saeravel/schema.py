"""Schema building blocks shared by every config module (below everything that uses them)."""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A closed set of option names: a misspelt value fails when the config is composed. Members
    compare equal to, print as and serialise as their plain string value."""

    __str__ = str.__str__
    __format__ = str.__format__
