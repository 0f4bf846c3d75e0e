"""What recon refuses before it works: numbers of the wrong type or out of range, whether they come from
the command line or from a file's field, and output folders that would replace what a user owns.

One `Number` states a value's type and range once; the command line uses it as the option's type (its
`--help` shows the range), the loaders check their files' fields with it. A failed check is a ValueError
whose message completes "OPTION VALUE: ..." or "FILE: FIELD VALUE: ...".
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Number:
    """An int or a float in [low, high] (either end open, or absent); always finite."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: Any) -> int | float:
        """The value as `kind` (from a string or a number; never a bool), or ValueError saying what is wrong."""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"must be {self.describe()}")
        try:
            number = self.kind(value) if not isinstance(value, str) or self.kind is float else int(value, 10)
        except (ValueError, OverflowError):
            raise ValueError(f"must be {self.describe()}") from None
        if self.kind is int and isinstance(value, float) and number != value:
            raise ValueError(f"must be {self.describe()}")
        if not math.isfinite(number) or not self.contains(number):
            raise ValueError(f"must be {self.describe()}")
        return number

    def contains(self, number: float) -> bool:
        above = self.low is None or (number > self.low if self.low_open else number >= self.low)
        below = self.high is None or (number < self.high if self.high_open else number <= self.high)
        return above and below

    def describe(self) -> str:
        """'an integer >= 1', 'a number in (0, 3.14159)', ..."""
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {opening}{self.low:g}, {self.high:g}{closing}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        return f"a finite {'integer' if self.kind is int else 'number'}"


# The ranges most options and fields share.
POSITIVE_INT = Number(int, 1)
POSITIVE = Number(float, 0, low_open=True)
NON_NEGATIVE = Number(float, 0)
FRACTION = Number(float, 0, 1, low_open=True)  # (0, 1]
FINITE = Number(float)


def checked_field(spec: Number, key: str, value: Any) -> int | float:
    """A file's field through `spec` (a JSON number, never a string); ValueError "key value: must be ..."."""
    try:
        if isinstance(value, str):
            raise ValueError(f"must be {spec.describe()}, not a string")
        return spec(value)
    except ValueError as error:
        raise ValueError(f"{key} {value!r}: {error}") from None


def nothing_to_lose(folder: Path) -> str | None:
    """Why writing a new folder at `folder` could lose something (it is a file, holds files, or cannot be
    made), or None when it is absent or empty and can be made."""
    if folder.is_symlink():
        return "is a link; name the folder itself"
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    if folder.is_dir():
        return "is not empty; choose a new folder" if any(folder.iterdir()) else None
    parent = next(p for p in folder.absolute().parents if p.exists())
    try:  # permission bits do not tell (root, read-only mounts, /proc): make a folder there and remove it
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as error:
        return f"cannot be created in {parent} ({error.strerror or error})"
    return None


def contains(folder: Path, path: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved: links and '..' followed)."""
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents
