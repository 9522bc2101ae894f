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


@given(st.integers(-(2**64), 2**64), st.none() | st.integers())
def test_integers_against_their_bound(value, low):
    assert is_int(value, low) == (low is None or value >= low)
    assert is_number(value) and is_number(value, finite=False)


def test_an_integer_beyond_a_floats_range_is_not_a_finite_number():
    huge = 10**400  # JSON allows it; float(huge) would overflow
    assert is_int(huge) and not is_number(huge) and is_number(huge, finite=False)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_numbers_finite_unless_asked(value):
    assert not is_int(value)
    assert is_number(value) == math.isfinite(value)
    assert is_number(value, finite=False)


def test_other_types_are_not_numbers():
    for value in ("1", None, [1], 1j):
        assert not is_int(value) and not is_number(value, finite=False)
