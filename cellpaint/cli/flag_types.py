"""The value types of main.py's flags: the text typed on the command line (or in a recipes/*.args
file) as typed values, a bad one an argparse error of one line. The schedules' own grammar is in
training/schedule.py; these only adapt it to argparse."""
from __future__ import annotations

import argparse
from typing import Callable, TypeVar

from cellpaint.core.settings import AUTO
from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction

T = TypeVar("T")


def bool_type(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def bool_or_auto(text: str) -> bool | str:
    return AUTO if text.lower() == AUTO else bool_type(text)


def int_list(text: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",")] if text else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    return a, b



def _from_parser(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A schedule parser as an argparse type: its ValueError (which names the flag) as the usage error."""
    def flag_type(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return flag_type


lr_type = _from_parser(LRSchedule.parse)
lr_groups_type = _from_parser(LRGroups.parse)
size_func_type = _from_parser(SizeFunction)


def name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names



def args_file_line(line: str) -> list[str]:
    """One argument per line of an @file (e.g. `--lr=const,1e-3`); blank and #-comment lines skipped."""
    line = line.strip()
    return [] if not line or line.startswith("#") else [line]


