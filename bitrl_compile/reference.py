"""The numpy reference executor: runs a Relax `main` (after ternarize / fuse / pack, before
legalize) op by op in numpy, with BitLinear computed by `quant.bitlinear_reference` and BitConv2d by
`quant.bitconv2d_reference`.

It is the independent oracle every compiled artifact is checked against: it shares no code with
TVM's lowering or with our TensorIR kernels, only the quantization math. Ops it does not know
raise a clear error naming the op. `check_artifact` is that check, run by the compile on every
artifact before it is written.
"""

from __future__ import annotations

import json
import math

import numpy as np
import tvm
from tvm import relax

from bitrl_compile import quant
from bitrl_compile.passes import bitconv_op, bitlinear_op
from bitrl_compile.runtime.policy import index_keys


def _attr(call, name, default=None):
    attrs = call.attrs
    if attrs is None or not hasattr(attrs, name):
        return default
    return getattr(attrs, name)


def _ints(values):
    return None if values is None else [int(v) for v in values]


def _axis(call):
    axis = _attr(call, "axis")
    if axis is None:
        return None
    if isinstance(axis, (int, np.integer)) or hasattr(axis, "value"):
        return int(axis)
    return tuple(int(a) for a in axis)


def _concrete(dims, sizes: dict) -> list[int]:
    """Shape dimensions (ints or symbolic PrimExprs like `batch * 3`) evaluated for this run."""
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    for var, size in sizes.items():
        analyzer.bind(var, size)
    return [int(d) if isinstance(d, (int, np.integer)) else int(analyzer.simplify(d)) for d in dims]


def _softmax(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(call, x, gamma, beta):
    axes = tuple(_ints(_attr(call, "axes")))
    eps = float(_attr(call, "epsilon"))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(eps))
    return (y * gamma + beta).astype(np.float32)


def _conv2d(call, x, w):
    from bitrl_compile.quant import im2col

    pad = _ints(_attr(call, "padding"))
    layouts = (str(_attr(call, "data_layout")), str(_attr(call, "kernel_layout")))
    if _ints(_attr(call, "dilation")) != [1, 1] or int(_attr(call, "groups")) != 1 or layouts != ("NCHW", "OIHW"):
        raise NotImplementedError("reference executor: conv2d with dilation, groups or layouts other than NCHW/OIHW")
    patches, (oh, ow) = im2col(x, w.shape[2:], _ints(_attr(call, "strides")), pad * 2 if len(pad) == 2 else pad)
    y = patches.astype(np.float32) @ w.reshape(w.shape[0], -1).T.astype(np.float32)
    return y.reshape(x.shape[0], oh, ow, w.shape[0]).transpose(0, 3, 1, 2).astype(np.float32)


def _gelu(x):
    """x * Phi(x) with the exact normal CDF (erf), as torch's GELU(approximate="none")."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1.0 + erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(x.dtype)


def _gelu_tanh(x):
    """GELU(approximate="tanh")."""
    return (0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))).astype(x.dtype)


_ELEMENTWISE = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
    "relax.power": np.power,
    "relax.nn.relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),
    "relax.tanh": np.tanh, "relax.exp": np.exp, "relax.log": np.log, "relax.sqrt": np.sqrt,
    "relax.negative": np.negative, "relax.abs": np.abs,
    "relax.sigmoid": lambda x: (1 / (1 + np.exp(-x))).astype(x.dtype),
    "relax.rsqrt": lambda x: (1 / np.sqrt(x)).astype(x.dtype),
    "relax.sin": np.sin, "relax.cos": np.cos,
    "relax.nn.gelu": _gelu, "relax.nn.gelu_tanh": _gelu_tanh,
}
_COMPARE = {
    "relax.greater": np.greater, "relax.greater_equal": np.greater_equal, "relax.less": np.less,
    "relax.less_equal": np.less_equal, "relax.equal": np.equal, "relax.not_equal": np.not_equal,
}


def _int_list(arg) -> list[int]:
    """A ShapeExpr, tuple of PrimValues or tuple of ints (strided_slice's axes/begin/end) as python ints."""
    values = arg.values if isinstance(arg, relax.ShapeExpr) else arg
    return [int(v.value) if hasattr(v, "value") else int(v) for v in values]


def _strided_slice(x, axes, begin, end, strides=None):
    index = [slice(None)] * x.ndim
    strides = _int_list(strides) if strides is not None else [1] * len(_int_list(axes))
    for axis, b, e, s in zip(_int_list(axes), _int_list(begin), _int_list(end), strides):
        index[axis] = slice(b, e, s)
    return x[tuple(index)]


def _eval_call(call, args, sizes):
    name = call.op.name
    if name == "relax.call_pure_packed":
        op = bitlinear_op.parse(call)
        conv = bitconv_op.parse(call) if op is None else None
        if conv is not None:
            x, w, gamma, bias = args[1:5]
            return bitconv_op.reference(x, w, gamma, bias, conv.activation, conv.layout, conv.geometry, conv.fold)
        if op is None:
            raise NotImplementedError(f"reference executor: packed function {call.args[0].global_symbol} "
                                      "is not supported")
        x, w, gamma, bias = args[1:5]
        return bitlinear_op.reference(x, w, gamma, bias, op.activation, op.layout, op.k)
    if name in _ELEMENTWISE:
        out = _ELEMENTWISE[name](*args)
        return np.asarray(out, dtype=np.result_type(*[np.asarray(a).dtype for a in args]))
    if name in _COMPARE:
        return _COMPARE[name](*args)
    x = args[0] if args else None
    if name == "relax.where":
        return np.where(*args).astype(np.result_type(args[1], args[2]))
    if name == "relax.strided_slice":
        return _strided_slice(*args)
    if name == "relax.take":
        return np.take(x, np.asarray(args[1]).astype(np.int64), axis=_axis(call))
    if name == "relax.full":
        return np.full(_int_list(x), args[1], dtype=str(_attr(call, "dtype")))
    if name == "relax.arange":
        return np.arange(*[int(a) for a in args], dtype=str(_attr(call, "dtype")))
    if name == "relax.matmul":
        return np.matmul(args[0], args[1]).astype(np.float32)
    if name == "relax.permute_dims":
        return np.transpose(x, _ints(_attr(call, "axes")))
    if name == "relax.reshape":
        return x.reshape(_concrete(call.ty.shape, sizes))
    if name == "relax.broadcast_to":
        return np.broadcast_to(x, _concrete(call.ty.shape, sizes)).copy()
    if name == "relax.astype":
        return x.astype(str(_attr(call, "dtype")))
    if name == "relax.clip":
        return np.clip(x, float(call.args[1].value), float(call.args[2].value)).astype(x.dtype)
    if name == "relax.nn.leakyrelu":
        alpha = np.float32(float(_attr(call, "alpha")))
        return np.where(x >= 0, x, alpha * x).astype(x.dtype)
    if name == "relax.nn.softmax":
        return _softmax(x, int(_attr(call, "axis")))
    if name == "relax.nn.log_softmax":
        s = x - x.max(axis=int(_attr(call, "axis")), keepdims=True)
        return s - np.log(np.exp(s).sum(axis=int(_attr(call, "axis")), keepdims=True))
    if name == "relax.argmax":
        return np.argmax(x, axis=_axis(call), keepdims=bool(_attr(call, "keepdims", False)))
    if name in ("relax.sum", "relax.mean", "relax.max", "relax.min"):
        f = {"relax.sum": np.sum, "relax.mean": np.mean, "relax.max": np.max, "relax.min": np.min}[name]
        return f(x, axis=_axis(call), keepdims=bool(_attr(call, "keepdims", False))).astype(x.dtype)
    if name == "relax.concat":
        return np.concatenate(list(x), axis=int(_attr(call, "axis")))
    if name == "relax.squeeze":
        axis = _attr(call, "axis")
        return np.squeeze(x, axis=None if axis is None else tuple(_ints(axis)))
    if name == "relax.expand_dims":
        return np.expand_dims(x, tuple(_ints(_attr(call, "axis"))))
    if name == "relax.flatten":
        return x.reshape(-1)
    if name == "relax.nn.layer_norm":
        return _layer_norm(call, *args)
    if name == "relax.nn.conv2d":  # the float policy (precision.py measures it): NCHW / OIHW, dilation 1, groups 1
        return _conv2d(call, *args)
    raise NotImplementedError(f"reference executor: op {name} is not supported")


def bitlinear_shapes(mod: tvm.IRModule, func_name: str = "main") -> list[tuple[int, int]]:
    """(in, out) of every BitLinear op of `mod[func_name]` in the order `run` evaluates them (a convolution: (0, 0)):
    the numbering of `run(..., silence=)`."""
    found: list[tuple[int, int]] = []
    for block in mod[func_name].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) \
                    and value.op.name == "relax.call_pure_packed":
                op = bitlinear_op.parse(value)
                if op is not None:
                    found.append((int(op.k), int(value.ty.shape[-1])))
                elif bitconv_op.parse(value) is not None:
                    found.append((0, 0))
    return found


def _silenced(call, x, bias) -> np.ndarray:
    """A BitLinear op with gamma 0: act(bias) in every row, as the kernels compute it (fma(acc, 0, bias)), without
    the matmul."""
    op = bitlinear_op.parse(call)
    n = int(call.ty.shape[-1])
    row = np.zeros((1, n), np.float32) if bias is None else np.asarray(bias, np.float32).reshape(1, n) + np.float32(0)
    row = quant.apply_activation(row, op.activation)  # fma(acc, 0, bias) = bias; the weights are not read
    return np.ascontiguousarray(np.broadcast_to(row, (*np.shape(x)[:-1], n)), np.float32)


def run(mod: tvm.IRModule, *inputs: np.ndarray, func_name: str = "main", silence: frozenset = frozenset()):
    """Execute `mod[func_name]` on numpy inputs. Returns numpy arrays (tuples stay tuples). `silence`: numbers of
    BitLinear ops (`bitlinear_shapes`' order) computed with gamma 0, as the layer-by-layer check runs them."""
    func = mod[func_name]
    counter = [0]
    env: dict = {}
    sizes: dict = {}  # symbolic dimension (tirx.Var) -> its size in this run, e.g. the batch
    for param, value in zip(func.params, inputs):
        env[param] = np.asarray(value)
        shape = getattr(param.ty, "shape", None)
        for dim, size in zip(shape or [], env[param].shape):
            if isinstance(dim, tvm.tirx.Var):
                sizes[dim] = tvm.tirx.IntImm("int64", size)
    n_inputs = len(inputs)
    if n_inputs != len(func.params):
        raise ValueError(f"{func_name} takes {len(func.params)} inputs, got {n_inputs}")

    def ev(expr):
        if isinstance(expr, relax.Var):
            return env[expr]
        if isinstance(expr, tvm.ir.Constant):  # tensors, and PrimValues (a python scalar)
            return expr.value.numpy() if hasattr(expr.value, "numpy") else expr.value
        if isinstance(expr, relax.Tuple):
            return tuple(ev(f) for f in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return ev(expr.tuple_value)[expr.index]
        if isinstance(expr, relax.Call):
            if silence and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_pure_packed":
                linear = bitlinear_op.parse(expr) is not None
                if linear or bitconv_op.parse(expr) is not None:
                    counter[0] += 1
                    if linear and counter[0] - 1 in silence:  # its input and bias only: the weights are not read
                        return _silenced(expr, ev(expr.args[1]), ev(expr.args[4]))
            args = [ev(a) if not isinstance(a, (relax.ShapeExpr, relax.ExternFunc, tvm.ir.StringImm)) else a
                    for a in expr.args]
            return _eval_call(expr, args, sizes)
        if isinstance(expr, (relax.ShapeExpr, tvm.ir.StringImm, relax.ExternFunc)):
            return expr
        if hasattr(expr, "value"):  # PrimValue
            return expr.value
        raise NotImplementedError(f"reference executor: expression {type(expr).__name__} is not supported")

    body = func.body
    try:
        for block in body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    raise NotImplementedError("reference executor: match_cast bindings are not supported")
                env[binding.var] = ev(binding.value)
        return ev(body.body)
    finally:  # `ev` refers to itself: a cycle that would keep every intermediate (and weight) until the next GC
        env.clear()


class CheckFailed(ValueError):
    """A compiled artifact fails when run, or disagrees with the reference (the message is one line)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------ checking a compiled artifact

CHECK_OBSERVATIONS = 16
# The stated tolerances (README "Correctness", docs/bitnet.md): ReLU policies are bit-exact; elsewhere an ulp of
# TVM's tanh/exp against numpy's can move one int8 rounding in the next layer.
CHECK_MAX_DIFF = 1e-2     # of the largest reference output, for every value
CHECK_CLOSE_DIFF = 1e-3   # of the largest reference output, for at least CHECK_CLOSE_SHARE of the observations
CHECK_CLOSE_SHARE = 0.9
# Networks with float reductions (RMSNorm, softmax, layer norm: BitNet backbones) sum in another order in TVM than
# in numpy, and with bf16-valued weights their quantizers sit on exact rounding ties, which those ulps break to
# either side; a deep network carries the moved int8 step on: measured up to 1.2 % of the largest feature, on 4
# of 16 observations (text encoder, bf16 checkpoint). A miscompile (a wrong kernel, scale, bias or activation, an
# out-of-bounds read) moves most observations, or one by more.
REDUCING_MAX_DIFF = 5e-2
REDUCING_CLOSE_SHARE = 0.5
_REDUCTIONS = {"relax.mean", "relax.sum", "relax.variance", "relax.prod", "relax.max", "relax.min", "relax.rsqrt",
               "relax.nn.softmax", "relax.nn.log_softmax", "relax.nn.layer_norm", "relax.nn.rms_norm",
               "relax.nn.group_norm"}


def float_reductions(mod: tvm.IRModule, func_name: str = "main") -> bool:
    """Whether `mod[func_name]` has float reductions or norms (`_REDUCTIONS`), whose summation order TVM and numpy
    do not share: the check's tolerance for them is REDUCING_*."""
    names: set[str] = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.op.name)

    relax.analysis.post_order_visit(mod[func_name], visit)
    return bool(names & _REDUCTIONS)


def check_observations(input_spec: dict, n: int, seed: int = 0) -> np.ndarray:
    """n observations of the kind the artifact takes (one-hot indices, uint8 images, or floats around the
    normalisation statistics), for the check."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in input_spec["shape"])
    kind = input_spec.get("preprocess", "none")
    if kind == "onehot":
        return rng.integers(0, int(input_spec["n"]), n)
    if kind == "image":
        return rng.integers(0, 256, (n, *shape)).astype(np.uint8)
    x = rng.standard_normal((n, *shape))
    norm = input_spec.get("normalize")
    if norm:
        x = np.asarray(norm["mean"]).reshape(shape) + np.sqrt(np.asarray(norm["var"])).reshape(shape) * x
    for _, offset, k in index_keys(input_spec):  # a Dict's Discrete key: its index (every value, so the check sees each)
        x[:, offset] = np.arange(n) % k
    return x.astype(np.float32)


def _state_inputs(input_spec: dict, n: int) -> tuple:
    """A recurrent policy's check inputs: a state of the size its spec says and a quarter of the rows starting an
    episode (the reset path); () for other policies."""
    rec = input_spec.get("recurrent")
    if not rec:
        return ()
    rng = np.random.default_rng(1)
    state = (0.5 * rng.standard_normal((n, int(rec["state_size"])))).astype(np.float32)
    return state, (rng.random(n) < 0.25).astype(np.float32)


def _with_state(result, extra: tuple) -> tuple:
    """(output, next state or None) as float32 arrays, from what a policy or the reference returned."""
    if extra:
        return np.asarray(result[0], np.float32), np.asarray(result[1], np.float32)
    return np.asarray(result, np.float32), None


def check_artifact(manifest: dict, members: dict[str, bytes], quantized, output, layers: dict | None = None) -> str:
    """Run the finished artifact (manifest + members, not yet written) once, in this process, as `runtime.load`
    would open it, and compare it with `run` on the quantized module and its own actions with the numpy
    post-processing. A runtime error or a difference beyond the stated tolerance raises CheckFailed (the
    compile writes nothing). Returns a line for the log: what was checked, or why it could not run here
    (another architecture: tests/test_rasp4.py checks those under qemu; CPU features this machine lacks).

    `layers` ({"ops": `legalize_bitlinear.gamma_params` of the lowered module, "window": BitLinear ops per layer}),
    for a deep network with float norms (BitNet backbones): when the whole network is outside the tolerance, each
    layer is checked alone instead (`check_layers`)."""
    from bitrl_compile.runtime import artifact as art
    from bitrl_compile.runtime import safetensors_np, weights
    from bitrl_compile.runtime.policy import (
        Policy,
        check_runnable_here,
        host_arch,
        normalization,
        prepare_observations,
    )

    arch = manifest["target"]["arch"]
    if arch != host_arch():
        return (f"not run before writing: compiled for {arch} and this machine is {host_arch()} (run it there, or "
                f"here under qemu with `bitrl-compile run {output}`)")
    try:
        check_runnable_here(manifest, output)
    except ValueError as e:
        return f"not run before writing: {_first_line(e)}"
    manifest = json.loads(art.manifest_bytes(manifest))  # what load() reads
    params, _ = safetensors_np.loads(members[art.PARAMS])
    params = weights.unpack_params(params, manifest.get("weights", {}))
    input_spec, output_spec = manifest["input"], manifest["output"]
    batch_max = (manifest.get("batch") or {}).get("max") or CHECK_OBSERVATIONS
    obs = check_observations(input_spec, max(1, min(CHECK_OBSERVATIONS, int(batch_max))))
    policy = None
    extra = _state_inputs(input_spec, len(obs))  # a recurrent policy's (state, episode_start); () otherwise
    state = expected_state = None
    try:
        policy = Policy(manifest, members[art.LIB], params, str(output))
        out, state = _with_state(policy.forward(obs, *extra), extra)
        single, _ = _with_state(policy.forward(obs[0], *(e[0] for e in extra)), extra)
        actions = _with_state(policy.act(obs, *extra), extra)[0] if output_spec["kind"] != "features" else None
    except Exception as e:  # noqa: BLE001 - whatever the compiled code raises (bad_alloc, a TVM error, ...)
        raise CheckFailed(f"the compiled artifact fails when run ({type(e).__name__}: {_first_line(e)[:200]}); "
                           f"nothing was written to {output}: please report it with the model") from None
    finally:
        if policy is not None:
            policy.close()
    try:
        x, _ = prepare_observations(input_spec, obs, normalization(input_spec))
        expected, expected_state = _with_state(run(quantized, x, *extra), extra)
        expected = expected.reshape(out.shape)
    except NotImplementedError as e:  # an op the reference does not know: ran, but not compared
        return f"ran the artifact on {len(obs)} observations; not compared with the numpy reference ({e})"
    # one observation: like the reference's row, or like the artifact's own batch row (the batch passed above; one
    # row alone cannot meet the share rule when an ulp moved one of its int8 roundings)
    tolerance = (REDUCING_MAX_DIFF, REDUCING_CLOSE_SHARE) if float_reductions(quantized) else \
        (CHECK_MAX_DIFF, CHECK_CLOSE_SHARE)
    problem = _mismatch(out, expected, *tolerance) or (_mismatch(single[None], expected[:1], *tolerance)
                                                       and _mismatch(single[None], out[:1], *tolerance))
    layerwise = None
    if problem and layers and state is None and float_reductions(quantized) and np.isfinite(out).all():
        layerwise = check_layers(manifest, members[art.LIB], params, obs, x, quantized, output, layers, tolerance,
                                  problem)
        problem = None if layerwise else problem
    if problem is None and state is not None:
        problem = _mismatch(state, expected_state, *tolerance)
        problem = problem and f"next state: {problem}"
    if problem is None and actions is not None:
        problem = _action_mismatch(output_spec, actions, out)
    if problem:
        raise CheckFailed(f"the compiled artifact disagrees with the numpy reference ({problem}); nothing was "
                           f"written to {output}: please report it with the model")
    return layerwise or f"checked the artifact against the numpy reference on {len(obs)} observations"


LAYER_EFFECT_DIFF = 0.05  # a layer run alone: its difference from the reference, of what the layer changes


def check_layers(manifest, lib: bytes, params: dict, obs, x, quantized, output, layers: dict, tolerance,
                  whole: str) -> str | None:
    """Each layer of a deep network alone against the reference: the BitLinear ops of every other layer silenced
    (gamma 0 in the artifact's parameters and in `run`: they add nothing to the residual stream), so the artifact
    runs the embedding, that layer, the norms and the head with its own kernels and wiring. A deep ternary network
    with float norms amplifies ulp-level differences (an ulp of a norm's sum moves an int8 rounding, the next layers
    carry it on: measured 3.4 of 4.9 on random 30-layer features from one float32 ulp at the input, in torch
    alone), so the whole network cannot be compared; one layer can: with every layer silenced the artifact equals
    the reference within the tolerance, and with one layer on, what it changes in each observation's features is
    the reference's within LAYER_EFFECT_DIFF (a moved rounding: measured up to 2 % on a 2B4T-shaped layer with a
    64-token text state; a wrong weight, scale or wire: the size of the change itself). None when the ops cannot be
    matched with the reference's (then the whole network's difference stands); a layer outside raises CheckFailed
    naming it."""
    from bitrl_compile.runtime.policy import Policy
    from bitrl_compile.runtime.tvm_runtime import aligned

    ops, window = layers["ops"], int(layers["window"])
    names = [name for _, _, name in ops]
    if window < 1 or [(k, n) for k, n, _ in ops] != bitlinear_shapes(quantized) \
            or not all(name in params for name in names) or len(set(names)) != len(names):
        return None  # (a gamma shared by two ops, deduplicated, cannot silence one of them)
    # one Policy for every run: its gammas are arrays of our own (zero copy into the runtime), set in place
    gammas = {name: aligned(np.array(params[name], np.float32)) for name in names}
    originals = {name: gamma.copy() for name, gamma in gammas.items()}
    policy = Policy(manifest, lib, {**params, **gammas}, str(output))

    def alone(on: range) -> tuple[np.ndarray, np.ndarray]:
        silence = frozenset(range(len(ops))) - set(on)
        for i, name in enumerate(names):
            gammas[name][...] = 0 if i in silence else originals[name]
        out = np.asarray(policy.forward(obs), np.float32)
        return out.reshape(len(out), -1), np.asarray(run(quantized, x, silence=silence), np.float32).reshape(
            len(out), -1)

    def fail(where: str, problem: str):
        raise CheckFailed(f"the compiled artifact disagrees with the numpy reference {where} ({problem}; the whole "
                          f"network: {whole}); nothing was written to {output}: please report it with the model")

    try:
        base_out, base = alone(range(0))
        problem = _mismatch(base_out, base, *tolerance)
        if problem:
            fail("with every layer silenced", problem)
        worst = 0.0
        for start in range(0, len(ops), window):
            out, expected = alone(range(start, start + window))
            problem = _mismatch(out, expected, tolerance[0], 0.0)
            effect = np.abs(expected - base).max(axis=1)
            share = np.abs(out - expected).max(axis=1) / np.maximum(effect, 1e-30)
            if problem is None and share.max() > LAYER_EFFECT_DIFF:
                problem = f"off by {share.max():.1%} of what the layer changes in an observation"
            if problem:
                fail(f"in layer {start // window} run alone", problem)
            worst = max(worst, float(share.max()))
    finally:
        policy.close()
    return (f"checked the artifact against the numpy reference layer by layer ({len(ops) // window} layers, each "
            f"alone within {worst:.1%} of what it changes, {len(obs)} observations); the whole network is beyond "
            f"the tolerance ({whole}): its depth amplifies ulp-level differences of the float norms")


def _mismatch(out: np.ndarray, expected: np.ndarray, max_diff: float = CHECK_MAX_DIFF,
              close_share: float = CHECK_CLOSE_SHARE) -> str | None:
    """Why the artifact's outputs are not the reference's within the stated tolerance, or None."""
    out = out.reshape(len(out), -1).astype(np.float64)
    expected = expected.reshape(len(expected), -1).astype(np.float64)
    finite = np.isfinite(expected)
    if (np.isfinite(out) != finite).any():
        return "NaN/Inf where the reference has finite values, or the other way round"
    if not finite.any():
        return None
    scale = max(float(np.abs(expected[finite]).max()), 1e-6)
    diff = np.where(finite, np.abs(out - np.where(finite, expected, 0)), 0.0)
    if diff.max() > max_diff * scale:
        return f"largest difference {diff.max():.3g} with outputs up to {scale:.3g}"
    close = float((diff.max(axis=1) <= CHECK_CLOSE_DIFF * scale).mean())
    if close < close_share:
        return f"only {close:.0%} of the observations within {CHECK_CLOSE_DIFF:g} of the largest output"
    return None


def _action_mismatch(output_spec: dict, actions: np.ndarray, out: np.ndarray) -> str | None:
    """act() against the numpy post-processing of the artifact's own forward() outputs."""
    from bitrl_compile.runtime.policy import postprocess

    expected = postprocess(output_spec, out)
    if output_spec["kind"] == "discrete":
        top2 = np.sort(out.reshape(len(out), -1), axis=1)[:, -2:] if out.shape[-1] > 1 else None
        clear = np.ones(len(out), bool) if top2 is None else top2[:, 1] - top2[:, 0] > 1e-6 * max(
            float(np.abs(out).max()), 1e-6)
        wrong = (np.asarray(actions).reshape(-1) != expected.reshape(-1)) & clear
        return f"act() chose other actions for {int(wrong.sum())} observations" if wrong.any() else None
    bounds = np.abs(np.concatenate([output_spec["low"], output_spec["high"]]))
    atol = 1e-4 * (1 + float(bounds[np.isfinite(bounds)].max(initial=0)))
    if actions.shape != expected.shape or not np.allclose(actions, expected, rtol=1e-4, atol=atol):
        return "act() returned actions that are not the post-processed forward() outputs"
    return None
