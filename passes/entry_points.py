"""entry_points: the artifact computes actions itself. Adds Relax functions around the network `main`:

    forward(obs, params...)          preprocessing, then the network: its raw output (logits, Q-values, mean)
    act(obs, params...)              forward, then the deterministic action (argmax; tanh squash + rescale, clip)
    sample(obs, noise, params...)    a stochastic action from caller-supplied noise (policies that sample)
    features(obs, params...)         backbones (output kind "features"): forward under the name apps expect

Pipeline position: after `lift_params`, before TVM's legalisation (LegalizeOps, FuseOps, FuseTIR turn the
pre- and post-processing into fused TensorIR kernels, which `runtime.plan` then calls directly). `main` stays
what it was (the network on prepared inputs: the reference compares against it).

Pre-processing (manifest input spec): "image" divides by 255 (folded into the first convolution's quantization
step when that reads the observation alone: `_image_fold`); "onehot" takes a float32 [B] of indices; then
normalisation (x - mean) / std, clipped, where std = sqrt(var + eps) is computed once here in float32, exactly
as the numpy runtime computes it. "text" (a state encoder reading text) stays a host step: the entry points
take the serialised tokens, as `main` does. Post-processing follows the output spec, with the same float32
operations in the same order as `runtime.policy.postprocess`, so the results agree bit for bit except tanh
and exp (TVM's and numpy's differ in the last place).

The constants (mean, std, bounds) become parameters with their values in the entry function's "params"
attribute, named obs_mean, obs_std, act_low, act_range, act_high, act_std: `lift_params.params_of` collects them
with main's.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm import tirx as tir
from tvm.relax.utils import copy_with_new_vars

ENTRY_POINTS = ("forward", "act", "sample", "features")


def _norm_params(input_spec: dict) -> dict[str, np.ndarray]:
    norm = input_spec.get("normalize")
    if not norm:
        return {}
    mean = np.asarray(norm["mean"], np.float32)
    var = np.asarray(norm["var"], np.float32)
    return {"obs_mean": mean, "obs_std": np.sqrt(var + np.float32(norm.get("eps", 1e-8)))}


class _Builder:
    """Bindings of one entry function: emit(call) binds a value (typed by TVM), param(name) a constant parameter."""

    def __init__(self, values: dict[str, np.ndarray]):
        self.values = values  # every extra parameter's value, by name
        self.extra: list[relax.Var] = []
        self._bb = relax.BlockBuilder()
        self._bb._begin_dataflow_block()

    def emit(self, call, name: str = "v", output: bool = False) -> relax.Var:
        """Bind `call` (nested calls get their own bindings)."""
        return self._bb.emit_output(call, name) if output else self._bb.emit(call, name)

    def block(self, last: bool = False) -> relax.DataflowBlock:
        """The bindings emitted so far, as one block; unless `last`, the next emit starts a new one."""
        block = self._bb._end_block()
        if not last:
            self._bb._begin_dataflow_block()
        return block

    def param(self, name: str) -> relax.Var:
        for var in self.extra:
            if var.name == name:
                return var
        value = self.values[name]
        var = relax.Var(name, relax.TensorType(value.shape, str(value.dtype)))
        self.extra.append(var)
        return var


def _preprocess(b: _Builder, obs: relax.Var, input_spec: dict):
    kind = input_spec.get("preprocess", "none")
    x = obs
    if kind == "onehot":
        x = b.emit(relax.op.one_hot(relax.op.astype(x, "int32"), relax.prim_value(tir.FloatImm("float32", 1.0)),
                                    relax.prim_value(tir.FloatImm("float32", 0.0)), int(input_spec["n"])))
    elif kind == "image":
        x = b.emit(relax.op.divide(x, relax.const(255.0, "float32")))
    if input_spec.get("normalize") and kind != "text":
        x = b.emit(relax.op.divide(relax.op.subtract(x, b.param("obs_mean")), b.param("obs_std")))
        clip = input_spec["normalize"].get("clip")
        if clip is not None:
            x = b.emit(relax.op.clip(x, relax.prim_value(tir.FloatImm("float32", -float(clip))),
                                     relax.prim_value(tir.FloatImm("float32", float(clip)))))
    return x


def _action(b: _Builder, out, spec: dict, batch, noise=None):
    """Post-processing as runtime.policy.postprocess does it (deterministic unless `noise` is given)."""
    f32 = "float32"
    if spec["kind"] == "discrete":
        if noise is None or spec.get("outputs") == "q_values":
            return b.emit(relax.op.argmax(out, axis=-1), "actions", output=True)
        z = b.emit(relax.op.subtract(out, relax.op.max(out, axis=-1, keepdims=True)))
        p = b.emit(relax.op.exp(z))
        p = b.emit(relax.op.divide(p, relax.op.sum(p, axis=-1, keepdims=True)))
        below = b.emit(relax.op.less(relax.op.cumsum(p, axis=-1), noise))
        count = b.emit(relax.op.sum(relax.op.astype(below, "int64"), axis=-1))
        last = relax.const(int(out.ty.shape[-1]) - 1, "int64")
        return b.emit(relax.op.minimum(count, last), "actions", output=True)
    shape = [int(d) for d in spec["shape"]]
    mean = b.emit(relax.op.reshape(out, relax.ShapeExpr([batch, *shape])))
    if noise is not None:
        mean = b.emit(relax.op.add(mean, relax.op.multiply(b.param("act_std"), noise)))
    squash = spec.get("squash", "clip")
    if squash == "tanh":
        half = relax.op.multiply(relax.op.add(relax.op.tanh(mean), relax.const(1.0, f32)), relax.const(0.5, f32))
        return b.emit(relax.op.add(b.param("act_low"), relax.op.multiply(half, b.param("act_range"))),
                      "actions", output=True)
    if squash == "clip":
        return b.emit(relax.op.minimum(relax.op.maximum(mean, b.param("act_low")), b.param("act_high")),
                      "actions", output=True)
    return b.emit(relax.op.add(mean, relax.const(0.0, f32)), "actions", output=True)


def _bounds(spec: dict) -> dict[str, np.ndarray]:
    if spec["kind"] != "continuous":
        return {}
    shape = [int(d) for d in spec["shape"]]
    low = np.asarray(spec["low"], np.float32).reshape(shape)
    high = np.asarray(spec["high"], np.float32).reshape(shape)
    values = {"act_low": low, "act_high": high, "act_range": high - low}
    if spec.get("log_std") is not None:
        values["act_std"] = np.exp(np.asarray(spec["log_std"], np.float32)).reshape(shape)
    return values


def entry_names(output_spec: dict) -> tuple[str, ...]:
    """The entry points an artifact with this output spec gets."""
    kind = output_spec["kind"]
    if kind == "features":
        return ("forward", "features")
    samples = (kind == "discrete" and output_spec.get("outputs") != "q_values") or \
        (kind == "continuous" and output_spec.get("log_std") is not None)
    return ("forward", "act", "sample") if samples else ("forward", "act")


IMAGE_SCALE = ("div", 255.0)  # the "image" preprocess, as conv kernels fold it (runtime.policy: x / 255 in float32)


def _image_fold(mod: tvm.IRModule, func: relax.Function, input_spec: dict):
    """(the binding of the convolution that alone reads main's input, its kernel with the image /255 folded in:
    (name, PrimFunc), the reshapes of main's input before it), or None. The fold computes the same float32 x / 255 in the kernel's quantization step (the
    reference's values, bit for bit) and saves the pass over the frame that the divide is. Where the kernel can
    (conv_kernels.takes_pixels), it reads the frame's uint8 pixels themselves: the entry points then take uint8
    observations (`pixel_input`), and a frame is not copied into float32 first."""
    if input_spec.get("preprocess", "none") != "image" or input_spec.get("normalize"):
        return None
    from .fuse_bitlinear import use_counts
    from .legalize_bitlinear import conv_with_prescale

    x_in, uses = func.params[0], use_counts(func)
    source = {x_in}  # main's input and its reshapes (legalize_bitlinear flattens a conv's input)
    reshapes = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or not any(a in source for a in _args(value)):
                continue
            if any(uses.get(v, 0) != 1 for v in source):
                return None
            if isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.reshape":
                source = {binding.var}
                reshapes.append(binding)
                continue
            if value.op.same_as(tvm.ir.Op.get("relax.call_tir")) and value.args[1].fields[0] in source:
                remade = conv_with_prescale(mod[value.args[0]], IMAGE_SCALE, pixels=True)
                return None if remade is None else (binding, remade, reshapes)
            return None
    return None


def _fold_image(bb: relax.BlockBuilder, func: relax.Function, fold, obs: relax.Var) -> relax.Function:
    """`func` (a copy of main) with the conv of `fold` (`_image_fold`) calling its folded kernel; when that reads
    uint8 pixels, on `obs` itself (through the reshapes before it, retyped uint8) and main's input left unused."""
    binding, (kernel, prim), reshapes = fold
    gv = bb.add_func(prim, kernel)  # once for all entry points (the builder keeps one of equal functions)
    changed, args = {}, binding.value.args[1]
    if pixel_input(prim):
        source = {func.params[0]: obs}
        for reshape in reshapes:
            value = relax.BlockBuilder().normalize(relax.op.reshape(source[reshape.value.args[0]],
                                                                    reshape.value.args[1]))
            source[reshape.var] = type(reshape.var)(reshape.var.name, value.ty)
            changed[reshape.var] = relax.VarBinding(source[reshape.var], value)
        args = relax.Tuple([source.get(a, a) for a in args.fields])
    call = binding.value
    changed[binding.var] = relax.VarBinding(binding.var, relax.Call(call.op, [gv, args, *call.args[2:]], call.attrs,
                                                                     call.ty_args))
    blocks = [_rebind(block, changed) for block in func.body.blocks]
    return relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure, func.attrs)


def pixel_input(kernel) -> bool:
    """Whether a conv kernel (PrimFunc of legalize_bitlinear.conv_with_prescale) reads its input as uint8 pixels."""
    return json.loads(str(kernel.attrs["bitrl.conv"])).get("dtype") == "uint8"


def _args(call: relax.Call) -> list:
    """A call's arguments, a call_tir's tensors included."""
    out = []
    for arg in call.args:
        out += list(arg.fields) if isinstance(arg, relax.Tuple) else [arg]
    return out


def _entry(bb: relax.BlockBuilder, main: relax.Function, name: str, input_spec: dict, output_spec: dict,
           values: dict[str, np.ndarray], main_values: list, recurrent: bool = False) -> relax.Function:
    func = copy_with_new_vars(main)
    x_in = func.params[0]
    fold = _image_fold(bb.get(), func, input_spec)
    pixels = fold is not None and pixel_input(fold[1][1])
    batch = x_in.ty.shape[0]
    b = _Builder(values)
    kind = input_spec.get("preprocess", "none")
    obs_shape = [batch] if kind == "onehot" else list(x_in.ty.shape)
    obs = relax.Var("obs", relax.TensorType(obs_shape, "uint8" if pixels else "float32"))
    if fold is not None:  # the conv kernel reading the observation divides it by 255 itself
        func = _fold_image(bb, func, fold, obs)
    n_main = 3 if recurrent else 1  # main(obs, state, episode_start) of a recurrent policy: both passed through
    inputs = [obs, *func.params[1:n_main]]
    noise = None
    if name == "sample":
        n = [batch, 1] if output_spec["kind"] == "discrete" else [batch, *(int(d) for d in output_spec["shape"])]
        noise = relax.Var("noise", relax.TensorType(n, "float32"))
        inputs.append(noise)
    x = obs if fold is not None else _preprocess(b, obs, input_spec)
    pre = b.block()
    # main's input variable is bound to the prepared observation, so main's body is reused as it is
    pre = relax.DataflowBlock([*pre.bindings, *([] if pixels else [relax.VarBinding(x_in, x)])])
    blocks = [pre, *func.body.blocks]
    result = func.body.body
    state = None
    if recurrent:  # main returns (raw output, next state): the entry point returns (its result, next state)
        state = b.emit(relax.TupleGetItem(result, 1), "state", output=True)
        result = b.emit(relax.TupleGetItem(result, 0), "out", output=name == "forward")
    if name in ("act", "sample"):
        result = _action(b, result, output_spec, batch, noise)
    if recurrent:
        result = b.emit(relax.Tuple([result, state]), "result", output=True)
    post = b.block(last=True)
    if post.bindings:
        blocks.append(post)
    attrs = dict(main.attrs)
    attrs["num_input"] = len(inputs)
    attrs["params"] = list(main_values) + [tvm.runtime.tensor(values[v.name]) for v in b.extra]
    attrs["global_symbol"] = name  # public: TVM's passes keep it
    body = relax.SeqExpr(blocks, result)
    return relax.Function(inputs + list(func.params[n_main:]) + b.extra, body, result.ty, True,
                          tvm.ir.make_node("ir.DictAttrs", **attrs))


def _rebind(block, changed: dict):
    """`block` with the bindings of the variables in `changed` replaced by theirs."""
    bindings = [changed.get(b.var, b) for b in block.bindings]
    return relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(bindings)


def entry_points(input_spec: dict, output_spec: dict):
    """The pass: adds the entry functions of `entry_names(output_spec)` to a module after lift_params. A recurrent
    policy (input spec "recurrent") has main(obs, state, episode_start, params...) -> (raw output, next state);
    each of its entry points takes (obs, state, episode_start[, noise]) and returns (its result, next state)."""
    recurrent = bool(input_spec.get("recurrent"))

    @tvm.transform.module_pass(opt_level=0, name="bitrl.EntryPoints")
    def _pass(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        main = mod["main"]
        expected = 3 if recurrent else 1
        if int(main.attrs["num_input"]) != expected:
            raise ValueError(f"entry_points expects main with {expected} input(s) before the parameters, not "
                             f"{int(main.attrs['num_input'])}; run lift_params first")
        values = {**_norm_params(input_spec), **_bounds(output_spec)}
        main_values = list(main.attrs["params"]) if "params" in main.attrs else []
        bb = relax.BlockBuilder(mod.clone())
        entries = {name: _entry(bb, main, name, input_spec, output_spec, values, main_values, recurrent)
                   for name in entry_names(output_spec)}
        mod = bb.get()
        for name, func in entries.items():
            mod[name] = func
        return mod

    return _pass


# ------------------------------------------------------------------------------------------- plans

class NoPlan(ValueError):
    """An entry point that is not a straight list of kernel calls (the Relax VM still runs it)."""


def _dims(shape, batch) -> list:
    dims = []
    for d in shape:
        if isinstance(d, tir.IntImm):
            dims.append(int(d))
        elif batch is not None and d.same_as(batch):
            dims.append("batch")
        else:
            raise NoPlan(f"dimension {d} is neither a constant nor the batch")
    return dims


def _reshape(mod: tvm.IRModule, call: relax.Call) -> bool:
    """Whether a call_tir only copies its one tensor argument into another shape (TVM's reshape pattern, e.g. the
    legalised relax.reshape): compact row-major tensors, so the plan gives its result as a view, no call."""
    func = mod[call.args[0]]
    fields = call.args[1].fields
    return isinstance(func, tvm.tirx.PrimFunc) and len(fields) == 1 and \
        str(fields[0].ty.dtype) == str(call.ty.dtype) and relax.analysis.has_reshape_pattern(func)


def plan_of(mod: tvm.IRModule, name: str) -> dict:
    """The call plan of entry function `name` after legalisation and fusion (the format: runtime/plan.py):
    its inputs, outputs, intermediate buffers and kernel calls in order. NoPlan if it is anything else. A reshape
    of an input or an intermediate into an intermediate is a buffer with "view" (its memory, another shape)."""
    func = mod[name]
    num_input = int(func.attrs["num_input"])
    batch = func.params[0].ty.shape[0] if func.params[0].ty.ndim else None
    if batch is not None and isinstance(batch, tir.IntImm):
        batch = None
    refs: dict = {}
    spec = {"inputs": [], "outputs": [], "buffers": [], "calls": []}
    for i, param in enumerate(func.params):
        if i < num_input:
            refs[param] = f"input:{i}"
            spec["inputs"].append({"name": param.name, "dtype": str(param.ty.dtype), "shape": _dims(param.ty.shape, batch)})
        else:
            refs[param] = f"param:{param.name}"
    result = func.body.body
    if not isinstance(result, relax.Var):
        raise NoPlan(f"{name} returns {type(result).__name__}, not a tensor or a tuple of tensors")
    results = [result]  # the returned tensors in order: one, or the fields of a returned tuple (recurrent policies)
    for block in func.body.blocks:
        for binding in block.bindings:
            if binding.var.same_as(result) and isinstance(binding.value, relax.Tuple):
                results = list(binding.value.fields)
    if not all(isinstance(r, relax.Var) for r in results):
        raise NoPlan(f"{name} returns a tuple of something other than variables")
    outputs: dict[int, dict] = {}
    views: dict[str, str] = {}  # a view buffer's ref -> the input or buffer whose memory it is
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Var) and value in refs:  # an alias
                refs[binding.var] = refs[value]
                continue
            if len(results) > 1 and binding.var.same_as(result):  # the returned tuple itself
                continue
            if not (isinstance(value, relax.Call) and value.op.same_as(call_tir) and len(value.args) == 2):
                what = value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else \
                    type(value).__name__  # not the expression itself: a constant prints as many lines
                raise NoPlan(f"{name} has a binding that is not a kernel call ({what})")
            out_ty = binding.var.ty
            if not isinstance(out_ty, relax.TensorType):
                raise NoPlan(f"{name}: a kernel with several outputs")
            args = []
            for arg in value.args[1].fields:
                if arg not in refs:
                    raise NoPlan(f"{name}: argument {arg} is not an input, parameter or earlier result")
                args.append(refs[arg])
            k = next((i for i, r in enumerate(results) if binding.var.same_as(r)), None)
            if k is None and _reshape(mod, value) and args[0].split(":")[0] in ("input", "buffer"):
                root = views.get(args[0], args[0])  # a view of a view is one of the first's memory
                refs[binding.var] = f"buffer:{len(spec['buffers'])}"
                views[refs[binding.var]] = root
                spec["buffers"].append({"dtype": str(out_ty.dtype), "shape": _dims(out_ty.shape, batch),
                                        "view": root})
                continue
            if k is not None:
                refs[binding.var] = f"output:{k}"
                outputs[k] = {"name": binding.var.name, "dtype": str(out_ty.dtype),
                              "shape": _dims(out_ty.shape, batch)}
            else:
                refs[binding.var] = f"buffer:{len(spec['buffers'])}"
                spec["buffers"].append({"dtype": str(out_ty.dtype), "shape": _dims(out_ty.shape, batch)})
            spec["calls"].append({"func": value.args[0].name_hint, "args": [*args, refs[binding.var]]})
    if len(outputs) != len(results):
        raise NoPlan(f"{name} returns one of its inputs")
    spec["outputs"] = [outputs[k] for k in range(len(results))]
    return spec
