"""Every numeric flag has a declared domain (cellpaint/core/bounds.py, on its settings field), checked
wherever the value comes from: the command line, an @file, a checkpoint. A value outside it is an
argparse error (exit 2) of one line naming the flag, the value and where it came from."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

import main
from cellpaint.cli import flags
from cellpaint.core import settings as S
from cellpaint.core.bounds import Bound

GROUPS = [S.DataSettings, S.ModelSettings, S.OptimSettings, S.AugmentSettings, S.PseudoLabelSettings,
          S.InferenceSettings, S.ExecSettings, S.Settings]
TRIES = [math.nan, math.inf, -math.inf, -1, 0, 0.5, 1, 1e300, 10 ** 20]


def bounded_flags() -> dict[str, tuple[Bound, bool]]:
    """flag -> (its bound, whether it takes two numbers), from the settings' declarations."""
    found = {}
    for cls in GROUPS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "bound" in f.metadata:
                pair = "tuple[float, float]" in str(hints[f.name])
                found[f.metadata["flag"]] = (f.metadata["bound"], pair or f.metadata["flag"] == "--pw-aug")
    return found


def test_every_numeric_flag_declares_its_domain():
    """A flag of int or float type in main.py without a bound would take NaN, inf or nonsense."""
    numeric = {flags.flag_name(a.dest) for a in main.build_parser()._actions
               if a.type in (int, float) or getattr(a.type, "__name__", "") in ("float_pair", "int_list")}
    assert numeric <= set(bounded_flags()), numeric - set(bounded_flags())
    assert len(bounded_flags()) >= 30


@pytest.mark.parametrize("flag", sorted(bounded_flags()))
def test_every_numeric_flag_refuses_values_outside_its_domain(flag, capsys, tmp_path):
    """NaN, both infinities, negative, zero and huge values: each either fits the declared domain
    (and parses) or is refused with exit 2 in one line naming the flag, and a bound's refusal says
    where the value came from."""
    bound, pair = bounded_flags()[flag]
    refused = 0
    for value in TRIES:
        text = str(int(value)) if bound.integer and isinstance(value, float) and value.is_integer() else str(value)
        if bound.integer and isinstance(value, float) and math.isfinite(value) and not value.is_integer():
            continue  # 0.5 for an integer flag: argparse's int() refuses it, tested below through nan
        number = int(text) if bound.integer and math.isfinite(float(text)) else float(text)
        argv = ["--save", str(tmp_path / "x"), "--seed", "1", f"{flag}={text},{text}" if pair else f"{flag}={text}"]
        if bound.holds(number):
            continue
        refused += 1
        with pytest.raises(SystemExit) as e:
            main.parse_settings(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, (flag, text, err)
        assert flag in lines[0], lines[0]
        if math.isfinite(float(text)) or not bound.integer:  # not argparse's int() refusing 'nan'
            assert "must be" in lines[0], lines[0]
    assert refused >= 3, (flag, refused)  # NaN and both infinities at least


def test_a_value_from_an_args_file_says_so(tmp_path, capsys):
    args_file = tmp_path / "bad.args"
    args_file.write_text("--bn-mom\nnan\n")
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", str(tmp_path / "x"), f"@{args_file}"])
    assert f"--bn-mom nan: must be a finite number in (0, 1] (from @{args_file})" in capsys.readouterr().err


def test_a_value_from_a_checkpoint_names_the_checkpoint(trained, tiny_competition, tmp_path, capsys):
    """--resume of a checkpoint whose saved --epochs is -5: the message blames the checkpoint, not a
    flag the user did not type; nothing is written."""
    state = torch.load(f"{trained}.0", weights_only=True)
    state["settings"]["optim"]["epochs"] = -5
    torch.save(state, tmp_path / "bad.0")
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--data", str(tiny_competition[0]), "--resume", str(tmp_path / "bad.0")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--epochs -5: must be an integer >= 1 (from the checkpoint {tmp_path / 'bad.0'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.0"]


def test_settings_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match=r"--bn-mom nan: must be a finite number in \(0, 1\]"):
        S.ModelSettings(bn_mom=math.nan)
    with pytest.raises(ValueError, match="--seed 2147483648: must be an integer in"):
        S.Settings(S.DataSettings("d"), seed=2 ** 31)
    assert S.Settings(S.DataSettings("d"), seed=2 ** 31 - 1).seed == 2 ** 31 - 1
