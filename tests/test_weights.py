"""Weight layouts (runtime/weights.py): base-3 storage and every kernel's 2-bit tiles round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bitrl_compile import layouts, targets
from bitrl_compile.runtime import weights

LAYOUTS = sorted({spec.layout for spec in targets.KERNELS})

trit_matrices = st.tuples(st.integers(1, 40), st.integers(1, 70)).flatmap(
    lambda nk: hnp.arrays(np.int8, nk, elements=st.integers(-1, 1)))


@settings(max_examples=60, deadline=None)
@given(trit_matrices)
def test_base3_round_trips_and_matches_the_compiler_side_packer(w_t):
    packed = weights.pack_base3(w_t)
    assert packed.shape == (w_t.shape[0], -(-w_t.shape[1] // 5)) and packed.max() <= 242
    np.testing.assert_array_equal(packed, layouts.pack_base3(w_t))
    np.testing.assert_array_equal(weights.unpack_base3(packed, w_t.shape[1]), w_t)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=40, deadline=None)
@given(w_t=trit_matrices)
def test_tiles_round_trip_and_storage_converts_both_ways(layout, w_t):
    n, k = w_t.shape
    tiles = weights.pack_tiles(w_t, layout)
    assert tiles.shape == weights.tiles_packed_shape(n, k, layout)
    np.testing.assert_array_equal(weights.unpack_tiles(tiles, n, k, layout), w_t)
    spec = {"storage": "base3", "compute": layout, "shape": [n, k]}
    stored = weights.to_storage(tiles, spec)
    np.testing.assert_array_equal(stored, weights.pack_base3(w_t))
    np.testing.assert_array_equal(weights.to_compute(stored, spec), tiles)


def test_tile_layout_is_the_documented_one():
    # tiles4x4: byte [jo, kb, i, j] holds w[4 jo + i, 16 kb + 4 q + j] + 1 at bits 2q+1..2q
    w_t = np.zeros((4, 16), np.int8)
    w_t[1, 2] = 1    # q = 0, j = 2 -> bits 1..0 of byte [0, 0, 1, 2] = 2
    w_t[1, 14] = -1  # q = 3, j = 2 -> bits 7..6 of the same byte = 0 (others are code 1)
    tiles = weights.pack_tiles(w_t, "tiles4x4")
    assert tiles.shape == (1, 1, 4, 4)
    assert tiles[0, 0, 1, 2] == 0b00_01_01_10
    assert tiles[0, 0, 0, 0] == 0b01_01_01_01


def test_padding_is_weight_zero():
    tiles = weights.pack_tiles(np.ones((3, 5), np.int8), "tiles8x4")
    codes = np.stack([(tiles >> (2 * q)) & 3 for q in range(4)], -1)  # [jo, kb, i, j, q]
    assert (codes[0, 0, 3:] == 1).all()             # channels 3..7 do not exist
    assert codes[0, 0, 0, 1, 1] == 1                # input 4 + 1 = 5 does not exist
    assert codes[0, 0, 0, 0, 1] == 2                # input 4 does


def test_corrupt_weights_are_refused_by_name():
    with pytest.raises(ValueError, match="out of range"):
        weights.unpack_base3(np.array([[243]], np.uint8), 5)
    with pytest.raises(ValueError, match="must be uint8"):
        weights.to_compute(np.zeros((2, 2), np.uint8), {"storage": "base3", "compute": "tiles8x4", "shape": [2, 5]})
    with pytest.raises(ValueError, match="weight p0"):
        weights.unpack_params({"p0": np.full((2, 1), 250, np.uint8)},
                              {"p0": {"storage": "base3", "compute": "tiles8x4", "shape": [2, 5]}})
    with pytest.raises(ValueError, match="unknown compute layout"):
        weights.tile_shape("rows2bit")


def test_lut_layout_is_the_documented_one():
    # lut16: byte [jo, kb, i, 0] holds the pair index c0 + 3 c1 of inputs (4kb, 4kb+1) in bits 3..0 and of
    # (4kb+2, 4kb+3) in bits 7..4; c = w + 1; K is padded to an even number of steps (8 inputs)
    w_t = np.zeros((16, 6), np.int8)
    w_t[2, 0], w_t[2, 1] = 1, -1  # pair (2, 0) -> index 2
    w_t[2, 3] = 1                 # pair (1, 2) -> index 7
    w_t[5, 4] = -1                # step 1, pair (0, 1) -> index 3; inputs 6, 7 are padding (index 4)
    lut = weights.pack_tiles(w_t, "lut16")
    assert lut.shape == (1, 2, 16, 1)
    assert lut[0, 0, 2, 0] == 2 | 7 << 4
    assert lut[0, 1, 5, 0] == 3 | 4 << 4
    assert lut[0, 0, 0, 0] == 4 | 4 << 4
    with pytest.raises(ValueError, match="table index > 8"):
        weights.unpack_tiles(lut | 0x0F, 16, 6, "lut16")


@pytest.mark.parametrize("layout", ["tiles8x4", "lut16"])
def test_read_params_streams_into_the_same_parameters_as_unpack_params(layout, monkeypatch):
    import io

    from bitrl_compile.runtime import safetensors_np

    monkeypatch.setattr(weights, "BLOCK_ROWS", 16)  # several blocks per weight, a partial last one
    rng = np.random.default_rng(0)
    w = {"p0": rng.integers(-1, 2, (70, 37)).astype(np.int8), "p2": rng.integers(-1, 2, (5, 3)).astype(np.int8)}
    layouts_ = {name: {"storage": "base3", "compute": layout, "shape": list(t.shape)} for name, t in w.items()}
    tensors = {"p0": weights.pack_base3(w["p0"]), "p1": rng.standard_normal((3, 7)).astype(np.float32),
               "p2": weights.pack_base3(w["p2"]), "p3": np.arange(5, dtype=np.int64)}
    blob = safetensors_np.dumps(tensors)
    streamed = weights.read_params(io.BytesIO(blob), len(blob), layouts_)
    expected = weights.unpack_params(tensors, layouts_)
    assert streamed.keys() == expected.keys()
    for name, value in expected.items():
        assert streamed[name].dtype == value.dtype and streamed[name].ctypes.data % 64 == 0
        np.testing.assert_array_equal(streamed[name], value)
    for name, t in w.items():
        np.testing.assert_array_equal(weights.unpack_tiles(streamed[name], *t.shape, layout), t)
    with pytest.raises(ValueError, match="truncated"):
        weights.read_params(io.BytesIO(blob[:-3]), len(blob), layouts_)
    bad = dict(tensors, p2=np.full_like(tensors["p2"], 250))
    blob = safetensors_np.dumps(bad)
    with pytest.raises(ValueError, match="weight p2 cannot be unpacked: base-3 byte out of range"):
        weights.read_params(io.BytesIO(blob), len(blob), layouts_)
    with pytest.raises(ValueError, match="weight p9 of manifest"):
        weights.read_params(io.BytesIO(blob), len(blob), dict(layouts_, p9=layouts_["p0"]))
