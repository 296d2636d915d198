"""The schedule-like flags (schedule.py): the multi-span learning rate at its span edges and after
the last, the pseudo-label size function's grammar and evaluation, the --lr-groups grammar, and
the one-line message of every refusal (it names the flag and the text the user typed)."""
from __future__ import annotations

import re

import pytest

from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction


def refused(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


# ------------------------------------------------------------------------------------- --lr


def test_each_span_starts_at_its_own_value_at_its_first_epoch():
    cosine = LRSchedule.parse("cosine,1.0,10,0.5,20,0.25")
    assert [cosine(e, 30) for e in (0, 10, 20)] == [1.0, 0.5, 0.25]
    assert cosine(5, 30) == pytest.approx(0.5) and cosine(15, 30) == pytest.approx(0.25)
    assert cosine(25, 30) == pytest.approx(0.125)
    assert cosine(9.999, 30) == pytest.approx(0, abs=1e-6) and cosine(19.999, 30) == pytest.approx(0, abs=1e-6)
    const = LRSchedule.parse("const,1.0,10,0.5,20,0.25")
    assert [const(e, 30) for e in (0, 9.99, 10, 19.99, 20, 29.99)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_after_the_last_epoch_cosine_is_zero_and_const_keeps_the_last_value():
    assert LRSchedule.parse("cosine,1.0,10,0.5")(30, 30) == 0.0
    assert LRSchedule.parse("cosine,1.0,10,0.5")(31.5, 30) == 0.0
    assert LRSchedule.parse("const,1.0,10,0.5,20,0.25")(30, 30) == 0.25
    assert LRSchedule.parse("const,1.0,10,0.5,20,0.25")(45, 30) == 0.25
    # a span boundary beyond the run: the first span decays towards it, the last is never reached
    beyond = LRSchedule.parse("cosine,1.0,40,0.5")
    assert beyond(20, 30) == pytest.approx(0.5) and beyond(40, 30) == 0.0
    assert LRSchedule.parse("const,1.0,40,0.5")(40, 30) == 0.5


@pytest.mark.parametrize("text, message", [
    ("linear,1e-3", "--lr 'linear,1e-3': schedule must be one of cosine, const, got 'linear'"),
    ("cosine,1e-3,5", "--lr 'cosine,1e-3,5': expected schedule,v1,e1,v2,e2,...,vn (an odd count of numbers: "
                      "a value for each span, an epoch between spans)"),
    ("cosine", "--lr 'cosine': expected schedule,v1,e1,v2,e2,...,vn (an odd count of numbers: "
               "a value for each span, an epoch between spans)"),
    ("cosine,1e-3,x,1e-4", "--lr 'cosine,1e-3,x,1e-4': not a number among ['1e-3', 'x', '1e-4']"),
    ("cosine,-1", "--lr 'cosine,-1': learning rates must be finite and >= 0"),
    ("cosine,inf", "--lr 'cosine,inf': learning rates must be finite and >= 0"),
    ("const,1e-3,5,nan", "--lr 'const,1e-3,5,nan': learning rates must be finite and >= 0"),
    ("cosine,1e-3,10,1e-4,5,0", "--lr 'cosine,1e-3,10,1e-4,5,0': span boundaries must be positive and increasing"),
    ("cosine,1e-3,5,1e-4,5,0", "--lr 'cosine,1e-3,5,1e-4,5,0': span boundaries must be positive and increasing"),
    ("cosine,1e-3,0,1e-4", "--lr 'cosine,1e-3,0,1e-4': span boundaries must be positive and increasing"),
])
def test_lr_refusals_name_the_text(text, message):
    with refused(message):
        LRSchedule.parse(text)


def test_a_first_span_shorter_than_one_epoch_is_allowed():
    schedule = LRSchedule.parse("const,1e-3,0.5,1e-4")
    assert (schedule(0.25, 2), schedule(0.5, 2)) == (1e-3, 1e-4)
    assert LRSchedule.parse("cosine, 0 ").values == (0.0,)  # a rate of 0 (a frozen run) is allowed


# ---------------------------------------------------------------------------- --pl-size-func


@pytest.mark.parametrize("text, x, value", [
    ("-x + 1", 0.25, 0.75), ("0.5 - -x / 2", 0.5, 0.75), ("+x", 0.5, 0.5), ("max(x, 0.5)", 0.75, 0.75),
    ("min(x, 0.5) + max(0.1, x / 10)", 0.25, 0.35), ("sqrt(x)", 0.25, 0.5), ("exp(log(x + 1)) - 1", 0.5, 0.5),
    ("x ** 2", 0.5, 0.25), ("2 ** 64 * 0 + x", 0.5, 0.5), ("(x + 1) ** -64", 0.0, 1.0), ("(0.6*x+0.4)", 0.5, 0.7),
])
def test_size_function_values(text, x, value):
    assert SizeFunction(text)(x) == pytest.approx(value)


@pytest.mark.parametrize("text, message", [
    ("x +", "--pl-size-func 'x +': not an arithmetic expression of x"),
    ("y", "--pl-size-func 'y': 'y' is not allowed (use numbers, x, + - * / **, min, max, sqrt, exp, log)"),
    ("x % 2", "--pl-size-func 'x % 2': 'x % 2' is not allowed (use numbers, x, + - * / **, min, max, sqrt, exp, log)"),
    ("not x", "--pl-size-func 'not x': 'not x' is not allowed (use numbers, x, + - * / **, min, max, sqrt, exp, log)"),
    ("~x", "--pl-size-func '~x': '~x' is not allowed (use numbers, x, + - * / **, min, max, sqrt, exp, log)"),
    ("abs(x)", "--pl-size-func 'abs(x)': 'abs(x)' is not allowed (use numbers, x, + - * / **, min, max, sqrt, exp, "
               "log)"),
    ("max(x, key=1)", "--pl-size-func 'max(x, key=1)': 'max(x, key=1)' is not allowed (use numbers, x, + - * / **, "
                      "min, max, sqrt, exp, log)"),
    ("math.sqrt(x)", "--pl-size-func 'math.sqrt(x)': 'math.sqrt(x)' is not allowed (use numbers, x, + - * / **, "
                     "min, max, sqrt, exp, log)"),
    ("max(x, y)", "--pl-size-func 'max(x, y)': 'y' is not allowed (use numbers, x, + - * / **, min, max, sqrt, exp, "
                  "log)"),
    # the flag named once (it was twice, the exponent's own message inside the evaluation's)
    ("2 ** 65", "--pl-size-func '2 ** 65' fails at x=0.0: exponent 65.0 too large"),
    ("x ** -65", "--pl-size-func 'x ** -65' fails at x=0.0: exponent -65.0 too large"),
    ("log(x)", "--pl-size-func 'log(x)' fails at x=0.0: math domain error"),
    ("0 / (1 - x)", "--pl-size-func '0 / (1 - x)' fails at x=1.0: float division by zero"),
    ("1e308 * 10 + x", "--pl-size-func '1e308 * 10 + x' is not finite at x=0.0"),
    ("(x * 1e308 * 1e308) * 0", "--pl-size-func '(x * 1e308 * 1e308) * 0' is not finite at x=0.001"),
    # a fraction of the wells outside [0, 1] anywhere in x in [0, 1] (checked every 0.001), never clipped
    ("5 * x", "--pl-size-func '5 * x' is 1.005 at x=0.201: the fraction of the wells labelled must stay in [0, 1] "
              "for x in [0, 1]"),
    ("-x", "--pl-size-func '-x' is -0.001 at x=0.001: the fraction of the wells labelled must stay in [0, 1] "
           "for x in [0, 1]"),
    ("1 - x * 1.0000001", "--pl-size-func '1 - x * 1.0000001' is -1e-07 at x=1: the fraction of the wells labelled "
                          "must stay in [0, 1] for x in [0, 1]"),
    ("max()", "--pl-size-func 'max()' fails at x=0.0: max expected at least 1 argument, got 0"),
])
def test_size_function_refusals_name_the_text(text, message):
    with refused(message):
        SizeFunction(text)


# -------------------------------------------------------------------------------- --lr-groups


def test_lr_groups_grammar_and_lookup():
    groups = LRGroups.parse("conv0,norm0=1/3, denseblock1 =0, features=2.5")
    assert groups.groups == ((("conv0", "norm0"), 1 / 3), (("denseblock1",), 0.0), (("features",), 2.5))
    assert [groups.group_of(n) for n in ("conv0.weight", "norm0.bias", "denseblock1.x", "features.y",
                                         "classifier.weight")] == [0, 0, 1, 2, None]
    first = LRGroups.parse("features.denseblock1=0.5,features=2")
    assert first.group_of("features.denseblock1.conv") == 0 and first.group_of("features.norm5") == 1


@pytest.mark.parametrize("text, message", [
    ("a,,b=1", "--lr-groups: an empty name in 'a,,b=1'"),
    ("=1", "--lr-groups: an empty name in '=1'"),
    ("a", "--lr-groups: 'a' has no '=MULT' after it"),
    ("a=1,b,c", "--lr-groups: 'b,c' has no '=MULT' after it"),
    ("a=x", "--lr-groups: 'x' is not a number or a fraction p/q"),
    ("a=1/0", "--lr-groups: '1/0' is not a number or a fraction p/q"),
    ("a=-1", "--lr-groups: multiplier '-1' must be a finite number >= 0"),
    ("a=inf", "--lr-groups: multiplier 'inf' must be a finite number >= 0"),
    ("a=nan", "--lr-groups: multiplier 'nan' must be a finite number >= 0"),
])
def test_lr_groups_refusals_name_the_text(text, message):
    with refused(message):
        LRGroups.parse(text)
