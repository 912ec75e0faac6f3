"""An image policy whose first convolution reads the frame's uint8 pixels (passes/entry_points.py `_image_fold`,
targets/conv_vnni.py `input_dtype`): the same actions, bit for bit, as the float32 frame / 255 of the reference;
the Python runtime and the C API take whole pixel values only, and refuse others in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from bitrl_compile import pipeline, quant, reference, targets
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.passes import bitconv_op
from bitrl_compile.runtime import load
from bitrl_compile.targets import conv_kernels, conv_vnni
from capi_lib import open_libbitrl

VNNI = "avx512_vnni" in Path("/proc/cpuinfo").read_text()
needs_vnni = pytest.mark.skipif(not VNNI, reason="needs an AVX-512 VNNI CPU (the kernel that reads uint8 pixels)")
SHAPE = (36, 36, 4)  # an SB3 image observation: HWC frames


def _frames(n: int, seed: int = 0) -> np.ndarray:
    """Frames with every pixel value, an all-black one (the absmax epsilon) and a dim one (max 1: a large scale)."""
    frames = np.random.default_rng(seed).integers(0, 256, (n, *SHAPE)).astype(np.uint8)
    frames[0] = 0
    frames[1] = frames[1] % 2
    frames[2].reshape(-1)[:256] = np.arange(256)
    return frames


def test_division_by_255_as_two_fmas_is_exact_on_every_pixel_value():
    assert conv_vnni.fma_division(255.0)
    x = np.arange(256, dtype=np.float32)
    r = np.float32(1) / np.float32(255)
    assert not np.array_equal(x * r, x / np.float32(255))  # a multiply alone is not: the fmas are needed


@needs_vnni
@pytest.mark.parametrize("geometry,hw,o,layout", [
    ((4, (8, 8), (4, 4), (0, 0, 0, 0)), (84, 84), 32, "nhwc"),  # NatureCNN's first layer on SB3's frames
    ((3, (8, 8), (4, 4), (0, 0, 0, 0)), (36, 36), 16, "nhwc"),  # C % 4 != 0: pixel by pixel
    ((4, (3, 3), (1, 1), (1, 1, 1, 1)), (9, 11), 16, "nhwc"),   # padded
])
def test_vnni_kernel_on_uint8_pixels_equals_the_reference_on_float_frames(geometry, hw, o, layout):
    g = bitconv_op.Geometry(*geometry)
    target = targets.tvm_target(targets.get_target("host"))
    spec = targets.kernel_spec(target)
    assert conv_kernels.takes_pixels(o, spec)
    kernel = conv_kernels.conv_kernel(g, hw, o, "relu", False, spec, input_layout=layout, prescale=("div", 255.0),
                                      input_dtype="uint8")
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=target)
    rng = np.random.default_rng(o)
    x = rng.integers(0, 256, (3, *hw, g.channels)).astype(np.uint8)
    x[0] = 0
    x[1] %= 2
    w = rng.integers(-1, 2, (o, g.channels, *g.kernel)).astype(np.int8)
    gamma, bias = np.float32([0.03]), rng.standard_normal(o).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((3, o, *g.output_hw(*hw)), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x.reshape(3, -1), conv_kernels.kernel_weights(w, layout), gamma,
                                                  bias)], out)
    want = quant.bitconv2d_reference(x.astype(np.float32), w, gamma, bias, g.stride, g.padding, layout=layout,
                                     prescale=("div", 255.0))
    np.testing.assert_array_equal(out.numpy(), quant.apply_activation(want, "relu"))


@needs_vnni
def test_first_layer_splits_its_chains_and_keeps_them_in_registers(tmp_path):
    """conv1's 4 positions x 2 tiles are too few vpdpbusd chains for its latency: two sets of accumulators (the odd
    kernel columns in the second), both in registers."""
    import json

    from bitrl_compile.bench.kernels import disassemble, inner_loops

    target = targets.tvm_target(targets.get_target("x86-avx512"))
    kernel = conv_kernels.conv_kernel(bitconv_op.Geometry(4, (8, 8), (4, 4), (0, 0, 0, 0)), (84, 84), 32, "relu",
                                      spec=targets.kernel_spec(target), input_layout="nhwc",
                                      prescale=("div", 255.0), input_dtype="uint8")
    assert json.loads(kernel.attrs["bitrl.schedule"])["knobs"] == {"positions": 4, "tiles": 2, "kw_groups": 0,
                                                                   "split": 1}
    tvm.compile(tvm.IRModule({"main": kernel}), target=target).export_library(str(tmp_path / "k.so"))
    loops = inner_loops(disassemble(tmp_path / "k.so", "objdump"))
    assert loops and all(lp["dot_instructions"] == ["vpdpbusd"] and lp["stores"] == 0 for lp in loops)


def test_kernels_that_cannot_read_pixels_refuse_them():
    spec = targets.kernel_spec(isa="avx2")
    assert not conv_kernels.takes_pixels(32, spec)
    with pytest.raises(ValueError, match="reads float32 input, not uint8"):
        conv_kernels.conv_kernel(bitconv_op.Geometry(4, (8, 8), (4, 4), (0, 0, 0, 0)), (84, 84), 32, "relu",
                                 spec=spec, input_layout="nhwc", prescale=("div", 255.0), input_dtype="uint8")


class SmallCNN(torch.nn.Module):
    """A first layer of 16 channels (the VNNI kernel's unit), the frame HWC as SB3 stores it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cnn = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 8, 4), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 4, 2),
                                       torch.nn.ReLU(), torch.nn.Flatten())
        self.head = torch.nn.Linear(16 * 3 * 3, 3)

    def forward(self, x):
        return self.head(self.cnn(x.permute(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def pixel_cnn(tmp_path_factory):
    loaded = LoadedPolicy(module=SmallCNN().eval(), onnx_model=None, output={"kind": "discrete", "n": 3,
                                                                            "outputs": "logits"},
                          input={"shape": list(SHAPE), "dtype": "float32", "preprocess": "image", "normalize": None},
                          source="test-pixels")
    return pipeline.compile_policy(loaded, "host", tmp_path_factory.mktemp("pixels") / "cnn.bitrl")


@needs_vnni
def test_image_policy_reads_uint8_frames_bit_exact_and_refuses_fractions(pixel_cnn):
    for plan in pixel_cnn.manifest["entry_points"].values():
        assert plan["inputs"][0]["dtype"] == "uint8" and plan["calls"][0]["func"].endswith("_div255_u8")
    frames = _frames(6)
    want = reference.run(pixel_cnn.quantized, frames.astype(np.float32) / 255)
    with load(pixel_cnn.path) as policy:
        np.testing.assert_array_equal(policy.forward(frames), want)
        np.testing.assert_array_equal(policy.forward(frames.astype(np.float32)), want)  # whole values: the same
        assert [policy.act(f) for f in frames] == list(want.argmax(axis=1))  # act()'s fast path
        assert policy.act(frames[3].astype(np.float32)) == want[3].argmax()
        for bad in (0.5, np.nan, 256.0, -1.0):
            frame = frames[3].astype(np.float32)
            frame[5, 7, 1] = bad
            with pytest.raises(ValueError, match=r"whole numbers in \[0, 255\].*pass the frame as uint8"):
                policy.act(frame)


@needs_vnni
def test_c_api_reads_float_pixels_into_the_uint8_plan(pixel_cnn):
    lib = open_libbitrl()
    handle = lib.bitrl_load(str(pixel_cnn.path).encode())
    assert handle, lib.bitrl_last_error()
    try:
        frames = _frames(5, seed=3)
        pixels = np.ascontiguousarray(frames, np.float32)
        out, actions = np.zeros((5, 3), np.float32), np.full(5, -1, np.int64)
        assert lib.bitrl_forward(handle, pixels.ctypes.data, 5, out.ctypes.data) == 0, lib.bitrl_last_error()
        assert lib.bitrl_act(handle, pixels.ctypes.data, 5, actions.ctypes.data) == 0, lib.bitrl_last_error()
        with load(pixel_cnn.path) as policy:
            np.testing.assert_array_equal(out, policy.forward(frames))
            np.testing.assert_array_equal(actions, policy.act(frames))
        pixels[1, 2, 3, 0] = 17.25
        assert lib.bitrl_act(handle, pixels.ctypes.data, 5, actions.ctypes.data) == -1
        error = lib.bitrl_last_error().decode()
        index = np.ravel_multi_index((1, 2, 3, 0), pixels.shape)
        assert "\n" not in error and f"obs[{index}] is 17.25" in error and "whole pixel values" in error
    finally:
        lib.bitrl_free(handle)
