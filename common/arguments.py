"""Argument types for `dcgan`'s command line: each converts its text and checks the range.

argparse turns the ArgumentTypeError these raise into the command's usage and one line, `dcgan
CMD: error: argument --n: must be an integer >= 1, got '-1'`, exit 2: a value out of range is
refused before anything starts, never carried into the run as a traceback or a silent default.
Each type also lists texts it refuses, so that the tests can feed every option of every command
a wrong value without a hand-kept list.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

SEED_MAX = 2**32 - 1  # numpy, torch and scikit-learn all take seeds in this range


class InputError(Exception):
    """Bad input found once the arguments are parsed (a path, a combination of options): one line, exit 2."""


class Checked:
    """An argparse type: `convert` the text, then refuse a value `accepts` rejects, saying what it `wants`."""

    def __init__(self, convert: Callable[[str], Any], wants: str, accepts: Callable[[Any], bool] = lambda v: True,
                 refused: Iterable[str] = ()):
        self.convert, self.wants, self.accepts = convert, wants, accepts
        self.refused = tuple(refused)  # texts this type must refuse; the tests feed each of them
        self.__name__ = wants  # argparse names a type by it in some of its own messages

    def __call__(self, text: str) -> Any:
        try:
            value = self.convert(text)
        except (ValueError, TypeError, OverflowError):
            value = None
        else:
            if self.accepts(value):
                return value
        raise argparse.ArgumentTypeError(f"must be {self.wants}, got {text!r}")

    def __repr__(self) -> str:
        return f"Checked({self.wants!r})"


def _text(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_text(kind: str, lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{_text(lo)}, {_text(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {_text(lo)}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {_text(hi)}"
    return kind


def integer(lo: int | None = None, hi: int | None = None, why: str = "") -> Checked:
    """An int in [lo, hi] (None: unbounded on that side); `why` follows the range in the error."""
    wants = _range_text("an integer", lo, hi) + (f" ({why})" if why else "")
    outside = [str(v) for v in ((lo - 1) if lo is not None else None, (hi + 1) if hi is not None else None)
               if v is not None]
    return Checked(int, wants, lambda v: (lo is None or v >= lo) and (hi is None or v <= hi),
                   refused=("two", "1.5", "", *outside))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           why: str = "") -> Checked:
    """A finite float in the range, each end closed unless told open."""
    wants = _range_text("a number", lo, hi, lo_open, hi_open) + (f" ({why})" if why else "")

    def accepts(v: float) -> bool:
        return math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))

    outside = [_text(v) for v in ((lo if lo_open else lo - 1) if lo is not None else None,
                                  (hi if hi_open else hi + 1) if hi is not None else None) if v is not None]
    return Checked(float, wants, accepts, refused=("fast", "nan", "inf", *outside))


def positive_int(why: str = "") -> Checked:
    return integer(1, why=why)


def non_negative_int(why: str = "") -> Checked:
    return integer(0, why=why)


def seed() -> Checked:
    return integer(0, SEED_MAX)


def comma_list(names: Mapping[str, Any]) -> Checked:
    """Comma-separated names, each one of `names`; the value is the tuple of what they map to."""

    def convert(text: str) -> tuple:
        picked = [part.strip() for part in text.split(",") if part.strip()]
        if not picked or any(p not in names for p in picked):
            raise ValueError(text)
        return tuple(names[p] for p in picked)

    return Checked(convert, f"comma-separated names from {', '.join(names)}", refused=("", "bogus", ",",
                                                                                       f"{next(iter(names))},bogus"))


def _readable(text: str) -> str:
    """The path as given; refused only when it exists and this process may not read it. A missing path is
    for the command to explain (on a Ray cluster it may exist on the nodes alone)."""
    try:
        if os.path.isdir(text):
            with os.scandir(text):
                pass
        elif os.path.exists(text):
            with open(text, "rb"):
                pass
    except PermissionError:
        raise argparse.ArgumentTypeError(f"cannot read {text}: permission denied") from None
    return text


# an image folder walked without permission to list it would look empty: refuse it before the command starts
readable_path = Checked(_readable, "a path this process may read")
