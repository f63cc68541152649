"""The command-line value parsers shared by the commands (`trio_mapper.tools.args`)."""

from __future__ import annotations

import argparse
import math

import pytest

from trio_mapper.tools.args import non_negative_float, positive_float


@pytest.mark.parametrize("text", ["0", "0.0", "0.00", "-0", "0e3", " 0 "])
def test_every_spelling_of_zero_is_zero_for_a_non_negative_value(text: str) -> None:
    value = non_negative_float(text)
    assert value == 0.0 and math.copysign(1.0, value) == 1.0


@pytest.mark.parametrize("text", ["-1", "-0.5", "nan", "ten"])
def test_a_negative_or_not_a_number_is_refused_saying_what_is_wanted(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r">= 0|expected a number"):
        non_negative_float(text)


def test_positive_values_pass_through_both_parsers() -> None:
    assert non_negative_float("2.5") == positive_float("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        positive_float("0")
