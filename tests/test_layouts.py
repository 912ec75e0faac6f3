"""Packing layouts round-trip for every size, including K that is not a multiple of the block."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bitrl_compile import layouts

trits = st.integers(1, 9).flatmap(
    lambda n: st.integers(1, 67).flatmap(lambda k: arrays(np.int8, (n, k), elements=st.integers(-1, 1))))


@settings(max_examples=150, deadline=None)
@given(trits)
@pytest.mark.parametrize("layout", sorted(layouts.LAYOUTS))
def test_pack_unpack_round_trips(layout, w_t):
    pack, unpack = layouts.LAYOUTS[layout]
    packed = pack(w_t)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack(packed, w_t.shape[1]), w_t)


def test_2bit_layout_is_the_documented_one():
    w_t = np.array([[-1, 0, 1, 1, 0]], np.int8)  # codes 0, 1, 2, 2 | 1 (+ padding 1, 1, 1)
    packed = layouts.pack_2bit(w_t)
    assert packed.tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 1 << 2 | 1 << 4 | 1 << 6]]


def test_base3_uses_five_trits_per_byte():
    w_t = np.ones((3, 1000), np.int8)
    assert layouts.pack_base3(w_t).shape == (3, 200)
    assert layouts.pack_base3(np.array([[1, 1, 1, 1, 1]], np.int8)).tolist() == [[242]]


def test_packing_rejects_values_outside_the_trit_range():
    with pytest.raises(ValueError, match="trits"):
        layouts.pack_2bit(np.array([[2, 0]], np.int8))


def test_corrupt_base3_bytes_are_detected():
    with pytest.raises(ValueError, match="corrupt"):
        layouts.unpack_base3(np.array([[250]], np.uint8), 5)
