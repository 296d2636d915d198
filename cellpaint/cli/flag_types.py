"""The value types of main.py's flags: the text typed on the command line (or in a recipes/*.args
file) as typed values, a bad one an argparse error of one line. The schedules' own grammar is in
training/schedule.py; these only adapt it to argparse."""
from __future__ import annotations

import argparse
import os
from typing import Callable, TypeVar

from cellpaint.core.settings import AUTO
from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction, SizeSchedule

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
size_schedule_type = _from_parser(SizeSchedule.parse)


def name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names



def args_file_line(line: str) -> list[str]:
    """One argument per line of an @file (e.g. `--lr=const,1e-3`); blank and #-comment lines skipped."""
    line = line.strip()
    return [] if not line or line.startswith("#") else [line]


class ArgsFileParser(argparse.ArgumentParser):
    """argparse with @files read strictly: UTF-8 (a byte order mark at the start is allowed), no
    invisible characters in an argument, no @file that includes itself; each problem is a usage
    error of one line naming the file and line (argparse itself would loop until RecursionError,
    raise UnicodeDecodeError, or pass a BOM on into an 'unrecognized argument' that looks fine)."""

    def _read_args_from_files(self, arg_strings: list[str]) -> list[str]:
        return self._expand(arg_strings, ())

    def _expand(self, arg_strings: list[str], reading: tuple[str, ...]) -> list[str]:
        out: list[str] = []
        for arg in arg_strings:
            if not arg or arg[0] not in (self.fromfile_prefix_chars or ""):
                out.append(arg)
                continue
            name = arg[1:]
            key = os.path.realpath(name)
            if key in reading:
                chain = " -> ".join("@" + n for n in (*self._names, name))
                self.error(f"@{name} includes itself ({chain})")
            try:
                with open(name, "rb") as f:
                    data = f.read()
            except OSError as e:
                self.error(f"cannot read @{name}: {e.strerror or e}")
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                line = data[:e.start].count(b"\n") + 1
                self.error(f"@{name} line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text")
            args = []
            for number, raw in enumerate(text.splitlines(), 1):
                hidden = next((c for c in raw if not c.isprintable() and c not in "\t"), None)
                if hidden is not None:
                    self.error(f"@{name} line {number}: {raw.strip()!r} holds the invisible character "
                               f"U+{ord(hidden):04X}")
                args.extend(self.convert_arg_line_to_args(raw))
            self._names = (*self._names, name)
            try:
                out.extend(self._expand(args, (*reading, key)))
            finally:
                self._names = self._names[:-1]
        return out

    _names: tuple[str, ...] = ()


