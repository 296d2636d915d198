"""The value types of main.py's flags: the text typed on the command line (or in a recipes/*.args
file) as typed values, a bad one an argparse error of one line. The schedules' own grammar is in
training/schedule.py; these only adapt it to argparse."""
from __future__ import annotations

import argparse
from typing import Callable, TypeVar

from cellpaint.core.settings import AUTO, plain_value
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
_lr_groups = _from_parser(LRGroups.parse)


def lr_groups_type(text: str) -> LRGroups | None:
    """--lr-groups P,Q=M,...; `none` clears groups set earlier (by a recipe's @file): the whole
    backbone then runs at --backbone-lr-mult."""
    return None if text.strip().lower() == "none" else _lr_groups(text)


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




class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default after its help, as it would be typed (`cosine,0.00015`,
    `0.1,0.1`, `../data`); the description keeps its own line breaks. Flags whose default is
    "not given" (None, empty, a switch's False) say nothing more, or what their help says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or "%(default)" in text
                or default is None or default is argparse.SUPPRESS or default == ""):
            return text
        value = plain_value(default)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = str(value).lower()
        shown = str(value).replace("%", "%%")  # the help text is %-formatted after this
        return f"{text} (default: {shown})" if text else f"(default: {shown})"
