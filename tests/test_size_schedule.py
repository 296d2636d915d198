"""--image-size-schedule (core/schedule.py SizeSchedule) at its edges: the smallest size and epoch
allowed, equal sizes or epochs refused, the text it was given kept as its text (what a checkpoint
records), and every refusal's exact line; and --pl-size-func's identity (equality and hash by its
text: settings compare and hash it)."""
from __future__ import annotations

import re

import pytest

from cellpaint.core.schedule import SizeFunction, SizeSchedule


def refused(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


def test_the_smallest_size_and_first_epoch_are_allowed():
    schedule = SizeSchedule.parse("1:0,2:3")
    assert schedule.steps == ((1, 0), (2, 3)) and schedule.last_epoch == 3
    assert [schedule.size_at(e) for e in (0, 2, 3, 9)] == [1, 1, 2, 2]


def test_the_text_given_is_the_text_kept():
    schedule = SizeSchedule.parse(" 224:0 , 384:30")
    assert schedule.steps == ((224, 0), (384, 30))
    assert schedule.text == " 224:0 , 384:30" and str(schedule) == " 224:0 , 384:30"
    # made from steps alone (no text), it reads as the canonical text, which parses back to it
    made = SizeSchedule(((224, 0), (384, 30), (512, 60)))
    assert str(made) == "224:0,384:30,512:60" and SizeSchedule.parse(str(made)).steps == made.steps


@pytest.mark.parametrize("text, message", [
    ("224:0,big:30", "--image-size-schedule '224:0,big:30': 'big:30' is not SIZE:EPOCH (two whole numbers, "
                     "e.g. 224:0,384:30,512:60)"),
    ("224:0,384", "--image-size-schedule '224:0,384': '384' is not SIZE:EPOCH (two whole numbers, "
                  "e.g. 224:0,384:30,512:60)"),
    ("224:0,384:30:1", "--image-size-schedule '224:0,384:30:1': '384:30:1' is not SIZE:EPOCH (two whole numbers, "
                       "e.g. 224:0,384:30,512:60)"),
    ("0:0", "--image-size-schedule '0:0': '0:0' needs a size >= 1 and an epoch >= 0"),
    ("12:0,24:-1", "--image-size-schedule '12:0,24:-1': '24:-1' needs a size >= 1 and an epoch >= 0"),
    ("224:5,384:30", "--image-size-schedule '224:5,384:30': the first size must start at epoch 0 (e.g. 224:0,...)"),
    ("224:0,224:30", "--image-size-schedule '224:0,224:30': sizes must rise (224 then 224)"),
    ("224:0,384:30,512:30", "--image-size-schedule '224:0,384:30,512:30': epochs must rise (30 then 30)"),
])
def test_refusals_name_the_text_and_the_step(text, message):
    with refused(message):
        SizeSchedule.parse(text)


def test_a_size_function_is_its_text():
    f = SizeFunction("0.6*x+0.4")
    assert f == SizeFunction("0.6*x+0.4") and hash(f) == hash("0.6*x+0.4")
    assert f != SizeFunction("0.4+0.6*x")  # the same values, another text: another setting
    assert f != "0.6*x+0.4" and SizeFunction("x") != None  # noqa: E711 (compared with anything)
    assert len({SizeFunction("x"), SizeFunction("x"), SizeFunction("1")}) == 2
