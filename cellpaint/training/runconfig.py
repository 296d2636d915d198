"""A checkpoint carries its run: the settings `--resume` restores and `--load` takes from it.

A checkpoint stores the run's arguments (checkpoints.checkpoint_args). `--resume` continues that
run, so every saved argument comes back unless the user typed the flag; a typed flag that
contradicts the saved value is refused in one line, unless it is in `MAY_CHANGE` (where and how
the run executes, not what it computes). `--load` takes only the architecture (`ARCHITECTURE`):
the rest of a fine-tuning or prediction run is the user's to choose.

Everything here is generic over the parser's destinations, so a flag added later is restored and
checked without touching this file; only a flag that may differ on resume has to be listed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cellpaint.training.checkpoints import ARCHITECTURE, plain_value
from cellpaint.data.metadata import DataError
from cellpaint.errors import UsageError

# how and where the run executes, not what it computes: these may differ from the checkpoint's
MAY_CHANGE = ("data", "image_cache", "cache_dir", "num_data_workers", "threads", "device", "disp_batches",
              "skip_bad_images", "compile", "channels_last", "precision", "fp16", "max_bad_steps",
              "tta", "tta_size", "pred_suffix", "save_embeddings")
# belong to one invocation, never restored: the mode, the outputs of this invocation, the debug switch
NOT_RESTORED = ("mode", "debug", "save", "resume")


class FlagError(UsageError, DataError):
    """A flag that contradicts the checkpoint it is used with (exit status 2, like argparse)."""


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations the user typed on the command line (not those left at their defaults).

    `parser` is parsed a second time with every default suppressed, so only typed flags appear
    in the namespace: a flag typed with its default value still counts as typed."""
    for action in parser._actions:  # (set_defaults would store SUPPRESS as a value of the namespace)
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv))))


def _from_saved(parser: argparse.ArgumentParser, dest: str, value):
    """A saved plain value back into the type the parser gives that flag (schedules, paths, pairs)."""
    action = next((a for a in parser._actions if a.dest == dest), None)
    if value is None or action is None:
        return value
    if isinstance(value, list) and callable(action.type) and action.type is not str:
        # a list flag saved as its values (int_list, name_list, float_pair): its text parsed again
        # gives back the flag's own type (a pair is a tuple, as typed), not the plain list
        value = ",".join(map(str, value))
    elif isinstance(value, list) and isinstance(action.default, tuple):
        return tuple(value)
    if isinstance(value, str) and callable(action.type) and action.type is not str:
        try:
            return action.type(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise DataError(f"the checkpoint's {flag_name(dest)} {value!r} no longer parses: {e}") from None
    return value


def _show(value) -> str:
    value = plain_value(value)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def restore_run(parser: argparse.ArgumentParser, args: argparse.Namespace, state: dict, path: str,
                given: set[str]) -> list[str]:
    """Put the saved run's arguments back into `args` (those the user did not type: not in `given`,
    see given_dests); refuse a typed flag that contradicts the checkpoint unless it may change.
    Returns the restored flags' names."""
    saved = state.get("args") or {}
    dests = {a.dest for a in parser._actions}
    restored = []
    for dest, value in saved.items():
        if dest in NOT_RESTORED or dest not in dests:  # a flag removed since the checkpoint was made: ignore it
            continue
        if dest in given:
            if dest not in MAY_CHANGE and plain_value(getattr(args, dest)) != plain_value(value):
                raise FlagError(
                    f"{flag_name(dest)} {_show(getattr(args, dest))} contradicts --resume {path}, which was run "
                    f"with {flag_name(dest)} {_show(value)}; leave the flag out to continue that run (to change "
                    f"it, start a new run with --load {path} --start-epoch N)")
            continue
        setattr(args, dest, _from_saved(parser, dest, value))
        restored.append(dest)
    return restored


def take_architecture(parser: argparse.ArgumentParser, args: argparse.Namespace, state: dict, path: str,
                      given: set[str]) -> None:
    """--load: the network is built as the checkpoint's was; a typed architecture flag that says
    otherwise is refused (the weights would not fit it)."""
    saved = state.get("args") or {}
    for dest in ARCHITECTURE:
        if dest not in saved:
            continue
        if dest in given and plain_value(getattr(args, dest)) != plain_value(saved[dest]):
            raise FlagError(f"{flag_name(dest)} {_show(getattr(args, dest))} contradicts --load {path}, which was "
                            f"made with {flag_name(dest)} {_show(saved[dest])}; leave the flag out: --load takes "
                            "the architecture from the checkpoint")
        setattr(args, dest, _from_saved(parser, dest, saved[dest]))
