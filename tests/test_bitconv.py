"""Ternary convolutions (BitConv2d, issue 17) end to end: the op's numpy meaning, the passes on a conv module (before
and after), the kernel on NatureCNN's geometries, and CNN policies compiled from a LoadedPolicy and from a .pt2 file
through the CLI, bit-exact against the numpy reference on x86, under qemu (rasp4) and through the C API."""

import functools
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from click.testing import CliRunner
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from bitrl_compile import pipeline, quant, reference, targets
from bitrl_compile.cli import main as cli
from bitrl_compile.devices import EmulatedPolicy
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.passes import bitconv_op
from bitrl_compile.passes.fuse_bitlinear import fuse_bitlinear
from bitrl_compile.passes.legalize_bitlinear import legalize_bitlinear
from bitrl_compile.passes.pack_weights import pack_weights
from bitrl_compile.passes.ternarize import ternarize
from bitrl_compile.runtime import load
from bitrl_compile.targets import conv_kernels, kernel_spec
from capi_lib import open_libbitrl

torch.set_num_threads(1)
SHAPE = (4, 36, 36)
IMAGE = {"shape": list(SHAPE), "dtype": "float32", "preprocess": "image", "normalize": None}
DISCRETE = {"kind": "discrete", "n": 3, "outputs": "logits"}


class NatureCNN(torch.nn.Module):
    """NatureCNN's layers (8x8/4, 4x4/2, 3x3/1) at 4x36x36 with 8/16/16 channels (36 -> 8 -> 3 -> 1), a padded 3x3
    before the last if `padded`, then linear heads."""

    def __init__(self, padded: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        convs = [torch.nn.Conv2d(4, 8, 8, 4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 4, 2), torch.nn.ReLU()]
        if padded:  # 3x3 -> 3x3
            convs += [torch.nn.Conv2d(16, 16, 3, 1, padding=1), torch.nn.ReLU()]
        self.cnn = torch.nn.Sequential(*convs, torch.nn.Conv2d(16, 16, 3, 1), torch.nn.ReLU(), torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    def forward(self, x):
        return self.head(self.cnn(x))


def _loaded(module, source="test-cnn"):
    return LoadedPolicy(module=module, onnx_model=None, input=dict(IMAGE), output=dict(DISCRETE), source=source)


def _frames(n, seed=1):
    frames = np.random.default_rng(seed).integers(0, 256, (n, *SHAPE)).astype(np.uint8)
    frames[0] = 0  # an all-black frame exercises the absmax epsilon
    return frames


@pytest.fixture(scope="module")
def host_cnn(tmp_path_factory):
    return pipeline.compile_policy(_loaded(NatureCNN()), "host", tmp_path_factory.mktemp("cnn") / "cnn.bitrl")


@pytest.fixture(scope="module")
def padded_rasp4(tmp_path_factory):
    """The padded CNN with its first layer in int8 and per-channel scales, for rasp4."""
    return pipeline.compile_policy(_loaded(NatureCNN(padded=True, seed=1)), "rasp4",
                                   tmp_path_factory.mktemp("cnn") / "rasp4.bitrl", per_channel=True, int8_layers=[0])


# ------------------------------------------------------------------------------------------------ the op's meaning

def test_reference_is_the_integer_convolution_of_the_per_sample_quantized_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 9, 10)).astype(np.float32) * np.float32([[[[0.01]]], [[[1]]], [[[50]]]])
    w = rng.integers(-1, 2, (5, 3, 3, 2)).astype(np.int8)
    gamma, bias = np.float32([0.7]), rng.standard_normal(5).astype(np.float32)
    y, (x_q, s, acc) = quant.bitconv2d_reference(x, w, gamma, bias, (2, 1), (1, 0, 2, 1), return_int=True)
    want_q, want_s = quant.quantize_activations(x.reshape(3, -1))  # one scale per sample
    np.testing.assert_array_equal(s, want_s)
    padded = np.pad(want_q.reshape(x.shape).astype(np.float64), ((0, 0), (0, 0), (1, 2), (0, 1)))
    conv = torch.nn.functional.conv2d(torch.tensor(padded), torch.tensor(w, dtype=torch.float64), stride=(2, 1))
    np.testing.assert_array_equal(acc, conv.numpy().astype(np.int32))
    np.testing.assert_array_equal(x_q[:, :, 1:-2, :-1], want_q.reshape(x.shape))
    scale = (gamma / s)[:, None, None, None].astype(np.float32)
    np.testing.assert_array_equal(y, quant.fma_f32(acc.astype(np.float32), np.broadcast_to(scale, acc.shape),
                                                   np.broadcast_to(bias[None, :, None, None], acc.shape)))


# ------------------------------------------------------------------------------------------------ the passes

@functools.cache
def _float_module(padded=True):
    return pipeline.to_relax(_loaded(NatureCNN(padded=padded)))  # passes are functional: one module serves all


def _ops(mod):
    names = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            op = bitconv_op.parse(expr)
            names.append(f"bitconv:{op.layout}:{op.activation}" if op else getattr(expr.op, "name", "call"))

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def test_ternarize_fuse_and_pack_rewrite_every_conv_and_stay_runnable():
    before = _float_module()
    assert _ops(before).count("relax.nn.conv2d") == 4 and "bitconv" not in " ".join(_ops(before))
    ternary = ternarize()(before)
    assert "relax.nn.conv2d" not in _ops(ternary) and _ops(ternary).count("bitconv:int8:none") == 4
    fused = fuse_bitlinear(ternary)
    assert _ops(fused).count("bitconv:int8:relu") == 4  # the bias add of a [1, O, 1, 1] reshape and relu folded
    assert "relax.add" not in _ops(fused) and "relax.nn.relu" not in _ops(fused)
    packed = pack_weights(fused)
    assert _ops(packed).count("bitconv:2bit:relu") == 4
    x = _frames(5).astype(np.float32) / 255
    out = reference.run(ternary, x)
    np.testing.assert_array_equal(reference.run(fused, x), out)
    np.testing.assert_array_equal(reference.run(packed, x), out)
    with torch.no_grad():  # a ternary policy close to the float one, not equal
        assert np.corrcoef(out.ravel(), NatureCNN(padded=True)(torch.tensor(x)).numpy().ravel())[0, 1] > 0.5


def test_int8_first_layer_and_per_channel_scales():
    mod = ternarize(per_channel=True, int8_layers=[0])(_float_module())
    layers = [bitconv_op.parse(b.value) for b in mod["main"].body.blocks[0].bindings]
    convs = [op for op in layers if op is not None]
    assert [op.layout for op in convs] == ["q8", "int8", "int8", "int8"]
    assert all(int(op.gamma.ty.shape[0]) == int(op.w.ty.shape[0]) for op in convs)
    assert np.abs(bitconv_op.constant_value(convs[0].w)).max() == 127


def test_legalize_lowers_to_the_conv_kernel_with_weights_in_its_layout():
    packed = pack_weights(fuse_bitlinear(ternarize()(_float_module())))
    lowered = legalize_bitlinear(None, spec=kernel_spec(None))(packed)
    kernels = sorted(gv.name_hint for gv in lowered.functions if gv.name_hint.startswith("bitrl_bitconv"))
    assert kernels == ["bitrl_bitconv_c16_3x3_o16_k3x3_s1x1_p0_0_0_0_relu",
                       "bitrl_bitconv_c16_3x3_o16_k3x3_s1x1_p1_1_1_1_relu",
                       "bitrl_bitconv_c4_36x36_o8_k8x8_s4x4_p0_0_0_0_relu",
                       "bitrl_bitconv_c8_8x8_o16_k4x4_s2x2_p0_0_0_0_relu"]
    assert "bitconv" not in " ".join(_ops(lowered))
    attrs = lowered[kernels[2]].attrs
    assert str(attrs["bitrl.weight_layout"]) == conv_kernels.LAYOUT and int(attrs["bitrl.k"]) == 256


def _frames_module(mode: str):
    """_float_module(padded=False) on NHWC frames transposed and scaled first (SB3's transpose, CleanRL's x / 255):
    x / 255 after the transpose, or x * (1 / 255) before it."""
    main = copy_with_new_vars(_float_module(padded=False)["main"])
    x_in = main.params[0]
    b, c, h, w = x_in.ty.shape
    x = relax.Var("x", relax.TensorType([b, h, w, c], "float32"))
    between = relax.Var("between", relax.TensorType([b, c, h, w] if mode == "div" else [b, h, w, c], "float32"))
    if mode == "div":
        steps = [(between, relax.op.permute_dims(x, [0, 3, 1, 2])),
                 (x_in, relax.op.divide(between, relax.const(255.0)))]
    else:
        steps = [(between, relax.op.multiply(relax.const(np.float32(1 / 255)), x)),
                 (x_in, relax.op.permute_dims(between, [0, 3, 1, 2]))]
    pre = relax.BindingBlock([relax.VarBinding(v, e) for v, e in steps])
    func = relax.Function([x], relax.SeqExpr([pre, *main.body.blocks], main.body.body), main.ret_ty, True,
                          main.attrs)
    return relax.transform.Normalize()(tvm.IRModule({"main": func}))


@pytest.mark.parametrize("mode,fold", [("div", "nhwc,div,255.0"), ("mul", f"nhwc,mul,{float(np.float32(1 / 255))!r}")])
def test_fuse_folds_the_input_transpose_and_scale_into_the_first_conv(mode, fold):
    shape = (36, 36, 4)
    ternary = ternarize()(_frames_module(mode))
    fused = fuse_bitlinear(ternary)
    assert not {"relax.permute_dims", "relax.divide", "relax.multiply"} & set(_ops(fused))
    first = next(op for op in map(bitconv_op.parse, [b.value for b in fused["main"].body.blocks[0].bindings]) if op)
    assert first.fold.text() == fold and first.x.same_as(fused["main"].params[0])
    x = np.random.default_rng(2).integers(0, 256, (4, *shape)).astype(np.float32)
    x[0] = 0
    np.testing.assert_array_equal(reference.run(fused, x), reference.run(ternary, x))  # the same values quantized


def test_plan_views_share_their_tensors_memory_and_keep_it_alive():
    from bitrl_compile.runtime.plan import shared_buffers

    f32 = "float32"
    plan = {"buffers": [{"dtype": f32, "shape": ["batch", 8], "view": "input:0"},
                        {"dtype": f32, "shape": ["batch", 2, 4]},
                        {"dtype": f32, "shape": ["batch", 8], "view": "buffer:1"},
                        {"dtype": f32, "shape": ["batch", 8]}, {"dtype": f32, "shape": ["batch", 8]}],
            "calls": [{"func": "a", "args": ["buffer:0", "buffer:1"]}, {"func": "b", "args": ["buffer:1", "buffer:3"]},
                      {"func": "c", "args": ["buffer:3", "buffer:2", "buffer:4"]}]}
    inputs = [np.zeros((3, 2, 4), np.float32)]
    b = shared_buffers(plan, 3, inputs)
    assert b[0].shape == (3, 8) and np.shares_memory(b[0], inputs[0]) and np.shares_memory(b[2], b[1])
    assert not np.shares_memory(b[4], b[1])  # buffer 1 is read through its view by the last call: not reused


@pytest.mark.parametrize("geometry,hw,o,activation,per_channel,weights,fold", [
    ((4, (8, 8), (4, 4), (0, 0, 0, 0)), (84, 84), 32, "relu", False, "trits", "nchw"),  # NatureCNN's, full size
    ((4, (8, 8), (4, 4), (0, 0, 0, 0)), (84, 84), 32, "relu", False, "trits", "nhwc,div,255.0"),  # SB3's frames
    ((32, (4, 4), (2, 2), (0, 0, 0, 0)), (20, 20), 64, "none", True, "trits", "nchw"),
    ((64, (3, 3), (1, 1), (0, 0, 0, 0)), (9, 9), 64, "relu", False, "int8", "nchw"),
    ((16, (3, 3), (1, 1), (1, 1, 1, 1)), (7, 7), 24, "relu", True, "trits", "nchw"),  # padded 3x3 (24: a tail block)
    ((3, (3, 2), (2, 1), (1, 0, 2, 1)), (7, 9), 5, "none", False, "int8", "nhwc,div,255.0"),  # asymmetric everything
    ((8, (3, 3), (1, 1), (1, 1, 1, 1)), (5, 5), 16, "tanh", False, "trits", "nhwc,mul,0.5"),  # NHWC rows, padded
    ((6, (3, 4), (1, 2), (1, 2, 0, 3)), (9, 11), 32, "relu", True, "int8", "nhwc,div,-3.0"),  # NHWC, C % 4 != 0
    ((5, (2, 3), (2, 1), (2, 1, 0, 1)), (17, 19), 16, "none", False, "int8", "nchw,mul,-0.25"),  # channel groups
])
def test_kernel_is_bit_exact_on_nature_cnn_geometries(geometry, hw, o, activation, per_channel, weights, fold):
    """The kernels (VNNI for O % 16 == 0 on such a host, else the LLVM-vectorised one) against the reference, with
    the input NCHW or NHWC and scaled first (a folded transpose and x / c, x * c: bitconv_op.InputFold)."""
    g, fold = bitconv_op.Geometry(*geometry), bitconv_op.InputFold.parse(fold)
    target = targets.tvm_target(targets.get_target("host"))  # a CPU with FMA, as every target of TARGETS has
    kernel = conv_kernels.conv_kernel(g, hw, o, activation, per_channel, targets.kernel_spec(target),
                                      input_layout=fold.layout, prescale=fold.prescale)
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=target)
    rng = np.random.default_rng(o)
    batch = 3
    x = rng.standard_normal((batch, g.channels, *hw)).astype(np.float32) * np.float32([[[[1e-3]]], [[[1]]], [[[9]]]])
    if fold.prescale is not None:  # raw values: frames, and a sample whose scaled absmax is below eps
        x = np.round(x * 30) if fold.prescale[1] == 255 else x
        x[0] *= np.float32(1e-5)
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if fold.layout == "nhwc" else x
    w = rng.integers(-1, 2, (o, g.channels, *g.kernel)) if weights == "trits" else \
        rng.integers(-127, 128, (o, g.channels, *g.kernel))
    w = w.astype(np.int8)
    gamma = (rng.random(o if per_channel else 1) + 0.1).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, o, *g.output_hw(*hw)), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x.reshape(batch, -1), conv_kernels.kernel_weights(w, fold.layout),
                                                  gamma, bias)], out)
    want = quant.apply_activation(quant.bitconv2d_reference(x, w, gamma, bias, g.stride, g.padding,
                                                            layout=fold.layout, prescale=fold.prescale), activation)
    if activation == "tanh":  # TVM's tanh and numpy's differ by an ulp
        np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=2e-7)
    else:
        np.testing.assert_array_equal(out.numpy(), want)


# ------------------------------------------------------------------------------------------------ compiled policies

def test_cnn_artifact_is_bit_exact_with_the_reference_on_uint8_frames(host_cnn):
    frames = _frames(9)
    with load(host_cnn.path) as policy:
        out = policy.forward(frames)
        single = policy.act(frames[3])
        actions = policy.act(frames)
    np.testing.assert_array_equal(out, reference.run(host_cnn.quantized, frames.astype(np.float32) / 255))
    assert single == actions[3]
    plan = host_cnn.manifest["entry_points"]["act"]  # /255 in the first kernel, the reshapes views: kernels only
    assert [c["func"][:13] for c in plan["calls"]] == ["bitrl_bitconv"] * 3 + ["bitrl_bitline"] * 2 + ["argmax"]
    assert plan["calls"][0]["func"].endswith("_div255")
    assert [b["view"] for b in plan["buffers"] if "view" in b] == ["input:0", "buffer:1", "buffer:3", "buffer:5"]
    np.testing.assert_array_equal(actions, out.argmax(axis=1))
    layers = host_cnn.manifest["layers"]
    assert [layer.get("op", "linear") for layer in layers] == ["conv2d"] * 3 + ["linear"] * 2
    assert layers[0]["conv"] == "8x8/4x4 p0,0,0,0" and layers[0]["shape"] == [8, 4 * 8 * 8]
    batch = host_cnn.manifest["batch"]
    assert batch["min"] == 1 and batch["max"] == bitconv_op.batch_bound(_float_module(padded=False), 1 << 20)
    assert 1024 <= batch["max"] < 1 << 20


def test_conv_policy_from_a_pt2_file_through_the_cli(tmp_path, host_cnn):
    module = NatureCNN().eval()  # host_cnn's policy
    ep = torch.export.export(module, (torch.zeros(2, *SHAPE),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(ep, tmp_path / "cnn.pt2")
    (tmp_path / "cfg.json").write_text(json.dumps({"input": {"preprocess": "image"}, "output": DISCRETE}))
    result = CliRunner().invoke(cli, ["compile", str(tmp_path / "cnn.pt2"), "--config", str(tmp_path / "cfg.json"),
                                      "-o", str(tmp_path / "cnn.bitrl")])
    assert result.exit_code == 0, result.output
    frames = _frames(6, seed=3)
    with load(tmp_path / "cnn.bitrl") as policy:
        out = policy.forward(frames)
        assert policy.manifest["batch"]["max"] == 4096  # the program's own bound is smaller than the memory one
        assert policy.manifest["source"]["format"] == "torch-export"
    np.testing.assert_array_equal(out, reference.run(host_cnn.quantized, frames.astype(np.float32) / 255))


def test_conv_policy_from_onnx(tmp_path, host_cnn):
    from bitrl_compile.frontends import load_policy

    torch.onnx.export(NatureCNN().eval(), (torch.zeros(1, *SHAPE),), str(tmp_path / "cnn.onnx"), dynamo=False,
                      input_names=["obs"], dynamic_axes={"obs": {0: "batch"}})
    loaded = load_policy(tmp_path / "cnn.onnx", config={"input": {"preprocess": "image"}, "output": DISCRETE})
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "cnn.bitrl")
    assert compiled.manifest["batch"] == host_cnn.manifest["batch"]  # the bound of the same network from torch
    frames = _frames(6, seed=6)
    with load(compiled.path) as policy:
        out = policy.forward(frames)
    np.testing.assert_array_equal(out, reference.run(host_cnn.quantized, frames.astype(np.float32) / 255))


def test_rasp4_cnn_is_bit_exact_under_qemu(padded_rasp4):
    with zipfile.ZipFile(padded_rasp4.path) as z:
        manifest = json.loads(z.read("manifest.json"))
    assert [layer["precision"] for layer in manifest["layers"]] == ["int8"] + ["ternary"] * 5
    frames = _frames(5, seed=4)
    with EmulatedPolicy(padded_rasp4.path, cpu="cortex-a72") as policy:
        out = policy.forward(frames)
    np.testing.assert_array_equal(out, reference.run(padded_rasp4.quantized, frames.astype(np.float32) / 255))


def test_c_api_gives_the_python_runtime_actions_and_refuses_a_batch_over_the_bound(host_cnn):
    lib = open_libbitrl()
    handle = lib.bitrl_load(str(host_cnn.path).encode())
    assert handle, lib.bitrl_last_error()
    try:
        frames = _frames(7, seed=5)
        pixels = np.ascontiguousarray(frames, np.float32)  # the C API takes float32 pixels; /255 is in the artifact
        out, actions = np.zeros((7, 3), np.float32), np.full(7, -1, np.int64)
        assert lib.bitrl_forward(handle, pixels.ctypes.data, 7, out.ctypes.data) == 0, lib.bitrl_last_error()
        assert lib.bitrl_act(handle, pixels.ctypes.data, 7, actions.ctypes.data) == 0, lib.bitrl_last_error()
        with load(host_cnn.path) as policy:
            np.testing.assert_array_equal(out, policy.forward(frames))
            np.testing.assert_array_equal(actions, policy.act(frames))
        bound = lib.bitrl_max_batch(handle)
        assert bound == host_cnn.manifest["batch"]["max"]
        assert lib.bitrl_act(handle, pixels.ctypes.data, bound + 1, actions.ctypes.data) == -1
        error = lib.bitrl_last_error().decode()
        assert "\n" not in error and str(bound) in error
        with load(host_cnn.path) as policy:  # the Python runtime refuses it too (its plans would run it)
            over = np.broadcast_to(frames[:1], (bound + 1, *frames.shape[1:]))
            with pytest.raises(ValueError, match=f"a batch of {bound + 1} observations is more than this artifact "
                                                 f"takes .{bound}, manifest batch.max.; split it"):
                policy.act(over)
    finally:
        lib.bitrl_free(handle)


@pytest.mark.parametrize("layer,words", [
    (torch.nn.Conv2d(4, 8, 3, groups=2), "groups 2"),
    (torch.nn.Conv2d(4, 8, 3, dilation=2), "dilation [2, 2]"),
    (torch.nn.Conv1d(4, 8, 3), "Conv1d"),
])
def test_other_convolutions_are_one_line_errors_naming_the_layer(layer, words):
    shape = (4, 12) if isinstance(layer, torch.nn.Conv1d) else (4, 12, 12)
    module = torch.nn.Sequential(layer, torch.nn.Flatten())
    loaded = LoadedPolicy(module, None, {"shape": list(shape), "dtype": "float32", "preprocess": "none",
                                         "normalize": None}, {"kind": "features"}, "test-cnn")
    with pytest.raises(pipeline.CompileError) as e:
        pipeline.to_relax(loaded)
    assert words in str(e.value) and "\n" not in str(e.value) and "module 0" in str(e.value)


# ------------------------------------------------------------------------------------------------ SB3 CnnPolicy

class _Stripes:
    """A tiny image task: 36x36x3 uint8 frames (channels-last, as gymnasium's image envs), a bright stripe in one of
    three columns, reward for naming it."""

    def __new__(cls):
        import gymnasium as gym

        class Stripes(gym.Env):
            observation_space = gym.spaces.Box(0, 255, (36, 36, 3), np.uint8)
            action_space = gym.spaces.Discrete(3)

            def reset(self, seed=None, options=None):
                super().reset(seed=seed)
                self.t = 0
                return self._frame(), {}

            def _frame(self):
                self.target = int(self.np_random.integers(3))
                frame = self.np_random.integers(0, 64, (36, 36, 3), dtype=np.uint8)
                frame[:, 12 * self.target:12 * self.target + 12] += 150
                return frame

            def step(self, action):
                self.t += 1
                return self._frame(), float(action == self.target), False, self.t >= 16, {}

        return Stripes()


def _env_frames(n: int) -> np.ndarray:
    env = _Stripes()
    frame, _ = env.reset(seed=7)
    frames = []
    for _ in range(n):
        frames.append(frame)
        frame, *_ = env.step(env.action_space.sample())
    return np.stack(frames)


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_sb3_cnn_policy_trained_here_loads_and_compiles_bit_exact(algo, tmp_path):
    import stable_baselines3 as sb3

    from bitrl_compile.frontends import load_policy

    kwargs = {"n_steps": 64, "batch_size": 32, "n_epochs": 1} if algo == "ppo" else \
        {"learning_starts": 16, "buffer_size": 256, "batch_size": 16}
    model = getattr(sb3, algo.upper())("CnnPolicy", _Stripes(), seed=0, **kwargs)
    model.learn(256 if algo == "ppo" else 64)
    model.save(tmp_path / "cnn.zip")
    loaded = load_policy(tmp_path / "cnn.zip")
    assert loaded.input["shape"] == [36, 36, 3] and loaded.input["preprocess"] == "image"  # the env's frames
    assert "CnnPolicy (NatureCNN)" in loaded.description
    frames = _env_frames(24)
    with torch.no_grad():  # the loaded float policy is SB3's network (HWC -> CHW and /255 as SB3 does them)
        obs = model.policy.obs_to_tensor(frames)[0]
        want = model.q_net(obs) if algo == "dqn" else model.policy.get_distribution(obs).distribution.logits
        mine = loaded.module(torch.tensor(frames, dtype=torch.float32) / 255)
        mine = mine if algo == "dqn" else torch.log_softmax(mine, dim=1)  # torch's Categorical normalises logits
    np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    if algo == "dqn":
        return  # one compile is enough: the network after the extractor is the same kind of Linear
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "cnn.bitrl")
    calls = [c["func"] for c in compiled.manifest["entry_points"]["forward"]["calls"]]
    assert calls[0].endswith(("_nhwc_div255", "_nhwc_div255_u8")) and len(calls) == 5  # no transpose, divide
    pixels = compiled.manifest["entry_points"]["forward"]["inputs"][0]["dtype"] == "uint8"  # or reshape of their own
    assert pixels == calls[0].endswith("_u8")  # the first kernel reads the frame's uint8 pixels where it can
    with load(compiled.path) as policy:
        out = policy.forward(frames)
    np.testing.assert_array_equal(out, reference.run(compiled.quantized, frames.astype(np.float32) / 255))


def test_conv_weight_layout_groups_four_inputs_and_pads_the_output_channels():
    w = np.arange(20 * 3 * 2 * 4).reshape(20, 3, 2, 4).astype(np.int8)  # KW = 4: groups of 4 kernel columns
    packed = conv_kernels.kernel_weights(w)
    assert packed.shape == (3 * 2, 32, 4) and not packed[:, 20:].any()
    np.testing.assert_array_equal(packed[1 * 2 + 1, 7], w[7, 1, 1, :])
    w = np.arange(16 * 5 * 3 * 3).reshape(16, 5, 3, 3).astype(np.int8)  # KW = 3: groups of 4 channels
    packed = conv_kernels.kernel_weights(w)
    assert packed.shape == (3 * 3 * 2, 16, 4)
    np.testing.assert_array_equal(packed[(2 * 3 + 1) * 2 + 1, 9], [w[9, 4, 2, 1], 0, 0, 0])


@pytest.mark.skipif("avx512_vnni" not in Path("/proc/cpuinfo").read_text(), reason="needs an AVX-512 VNNI CPU")
def test_vnni_conv_kernel_keeps_its_accumulators_in_registers(tmp_path):
    from bitrl_compile.bench.kernels import disassemble, inner_loops
    from bitrl_compile.targets import conv_vnni

    assert conv_vnni.blocking(7, 4, 144) == (7, 2) and conv_vnni.blocking(20, 2, 64) == (4, 2)  # 4: transposed stores
    g = bitconv_op.Geometry(32, (4, 4), (2, 2), (0, 0, 0, 0))
    target = targets.tvm_target(targets.get_target("x86-avx512"))
    kernel = conv_kernels.conv_kernel(g, (20, 20), 64, "relu", False, targets.kernel_spec(target))
    assert json.loads(kernel.attrs["bitrl.schedule"])["knobs"] == {"positions": 3, "tiles": 4, "kw_groups": 1,
                                                                   "split": 0}
    tvm.compile(tvm.IRModule({"main": kernel}), target=target).export_library(str(tmp_path / "k.so"))
    loops = inner_loops(disassemble(tmp_path / "k.so", "objdump"))
    assert loops and all(lp["dot_instructions"] == ["vpdpbusd"] and lp["stores"] == 0 for lp in loops)
    assert min(lp["per_1000_macs"] for lp in loops) < 30  # one vpdpbusd per 64 MACs, few loads beside them
