"""core.plain: config values as plain Python, and the one rule for "an integer" / "a number"."""

import math

from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ssd_lightning.core.plain import is_int, is_number, to_plain


def test_to_plain_turns_omegaconf_containers_into_python_ones():
    cfg = OmegaConf.create({"a": [1, {"b": (2, 3)}], "c": "x"})
    assert to_plain(cfg) == {"a": [1, {"b": [2, 3]}], "c": "x"}
    assert type(to_plain(cfg)["a"]) is list


@given(st.booleans(), st.none() | st.integers(-5, 5))
def test_a_bool_is_neither_an_integer_nor_a_number(value, low):
    assert not is_int(value, low)
    assert not is_number(value) and not is_number(value, finite=False)


@given(st.integers(), st.none() | st.integers())
def test_integers_against_their_bound(value, low):
    assert is_int(value, low) == (low is None or value >= low)
    assert is_number(value)  # also beyond a float's range: an int is always finite


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_numbers_finite_unless_asked(value):
    assert not is_int(value)
    assert is_number(value) == math.isfinite(value)
    assert is_number(value, finite=False)


def test_other_types_are_not_numbers():
    for value in ("1", None, [1], 1j):
        assert not is_int(value) and not is_number(value, finite=False)
