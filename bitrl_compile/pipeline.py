"""The whole compile on one screen: policy file -> Relax -> our passes -> TVM -> policy.bitrl.

    load_policy (frontends)      safe loading; torch.nn.Module or ONNX + input/output specs (the caller's step)
    to_relax (importing.py)      torch.export -> from_exported_program  |  relax.frontend.onnx; refusals by name
    passes                       one Sequential: ternarize -> fuse_bitlinear -> pack_weights (still runnable:
                                 the numpy reference's input) -> legalize_bitlinear (TensorIR kernels) -> lift_params
                                 -> entry_points (act/forward/sample: pre + network + post) -> TVM's legalise + fuse
                                 -> schedule_float (the legalised float TensorIR scheduled for the CPU)
    entry_plans                  each entry point's kernel calls, for the manifest (runtime/plan.py, runtime/capi run them)
    store_weights                kernel-layout weights -> base-3 (runtime/weights.py unpacks at load)
    tvm.compile + export_library (the target's cross compiler)
    reference.check_artifact     the artifact run once against the numpy reference (host architecture); refused if not
    write_artifact (atomic)

The target's kernel (targets.kernel_spec) is resolved once per compile and handed to the passes.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bitrl_compile import __version__, layouts
from bitrl_compile.importing import CompileError, first_line, to_relax
from bitrl_compile.runtime import artifact as art
from bitrl_compile.runtime import safetensors_np
from bitrl_compile.runtime.specs import check_output_size, check_specs


class CompilerBug(RuntimeError):
    """The compiled artifact fails its check against the numpy reference: a bug of this compiler or of TVM,
    not bad input (the CLI's exit code 3); nothing was written."""


@dataclass
class CompiledPolicy:
    path: Path
    manifest: dict
    quantized: object                       # the Relax module after pack_weights (reference input)
    params: dict[str, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    layers: dict | None = None              # a backbone's BitLinear calls per layer (`reference.check_layers`)


# ------------------------------------------------------------------------------------ passes

QUANTIZED = "bitrl.PackWeights"  # the module after this pass is the quantized policy the numpy reference runs


def passes(tvm_target, spec, *, per_channel: bool = False, schedules=None, until: str | None = None,
           specs: tuple[dict, dict] | None = None, int8_layers=()):
    """The compile's passes, in order: the one list to read (and to add a pass to). With `until` (a pass name,
    e.g. QUANTIZED) the list stops after that pass. With `specs` (the manifest's input and output spec) the
    module gains the entry points act/forward/... with pre- and post-processing, legalised and fused into
    TensorIR kernels by TVM's own passes, so that `entry_points.plan_of` reads each entry's kernel calls.
    `int8_layers` (layer indices, negative from the end) are kept in int8 (mixed precision, passes/ternarize.py)."""
    import tvm
    from tvm import relax

    from bitrl_compile.passes.entry_points import entry_points
    from bitrl_compile.passes.fuse_bitlinear import fuse_bitlinear
    from bitrl_compile.passes.legalize_bitlinear import legalize_bitlinear
    from bitrl_compile.passes.lift_params import lift_params
    from bitrl_compile.passes.pack_weights import pack_weights
    from bitrl_compile.passes.schedule_float import schedule_float
    from bitrl_compile.passes.split_to_slices import split_to_slices
    from bitrl_compile.passes.ternarize import ternarize

    sequence = [
        split_to_slices,                                  # split's parts -> strided slices (plans: one output each)
        ternarize(per_channel, int8_layers),              # float weights -> gamma * trits (absmean), or int8
        fuse_bitlinear,                                   # permute_dims -> matmul (-> add) (-> act): one BitLinear
        pack_weights,                                     # trits -> 2-bit constants (runnable: the reference's input)
        legalize_bitlinear(tvm_target, schedules, spec),  # BitLinear -> call_tir to the target's TensorIR kernel
        lift_params,                                      # weight constants -> main's parameters (params.safetensors)
    ]
    if specs is not None:
        sequence += [
            entry_points(*specs),                         # act/forward/sample/features: pre + main + post
            _with_target(tvm_target, relax.backend.DispatchSortScan()),  # cumsum (sampling) -> TensorIR
            relax.transform.LegalizeOps(),                # TVM's: the pre/post ops -> TensorIR, fused per kernel
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            schedule_float(tvm_target),                   # the float TensorIR left (attention's matmuls, norms,
        ]                                                 #   softmax): vectorised, register-blocked
    if until is not None:
        sequence = sequence[:[p.info.name for p in sequence].index(until) + 1]
    return tvm.transform.Sequential(sequence, name="bitrl")


def _with_target(tvm_target, inner):
    """A TVM pass that reads the current target (Target.current()), run with `tvm_target` current."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=f"bitrl.{inner.info.name}")
    def _pass(mod, _ctx=None):
        with tvm_target:
            return inner(mod)

    return _pass


def run_passes(mod, tvm_target, spec, *, per_channel: bool = False, schedules=None, specs=None, int8_layers=()):
    """Run `passes` on a float Relax module. Returns (the quantized module after QUANTIZED, the lowered module
    ready for tvm.compile, its parameters by name)."""
    import tvm

    from bitrl_compile.passes.lift_params import params_of

    @tvm.instrument.pass_instrument
    class _KeepQuantized:
        module = None

        def run_after_pass(self, mod, info):
            if info.name == QUANTIZED:
                self.module = mod

    keep = _KeepQuantized()
    try:
        with tvm.transform.PassContext(instruments=[keep]):
            lowered = passes(tvm_target, spec, per_channel=per_channel, schedules=schedules, specs=specs,
                             int8_layers=int8_layers)(mod)
    except ValueError as e:
        if keep.module is not None:  # past quantization: a bug of ours, not the model's
            raise
        raise CompileError(f"quantization failed: {first_line(e)}") from e  # e.g. NaN/Inf ONNX initialisers
    lowered, params = params_of(lowered)
    return keep.module, lowered, params


def store_weights(lowered, params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Kernel-layout weights -> base-3 storage. Returns (the params to store, manifest["weights"])."""
    from bitrl_compile.passes.legalize_bitlinear import weight_params
    from bitrl_compile.runtime import weights

    specs = weight_params(lowered)
    return {name: weights.to_storage(v, specs[name]) if name in specs else v for name, v in params.items()}, specs


def bitlinear_layers(mod) -> list[dict]:
    """The manifest's per-layer table: index, shapes, precision ("ternary" or "int8"), activation, layout, scale
    kind, bits per weight, zero fraction (`compile_policy` adds the stored weight bytes)."""
    from tvm import relax

    from bitrl_compile.passes import bitconv_op, bitlinear_op
    from bitrl_compile.targets import conv_kernels

    layers = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value if isinstance(binding.value, relax.Call) else None
            op = value is not None and (bitlinear_op.parse(value) or bitconv_op.parse(value))
            if not op:
                continue
            conv, k = isinstance(op, bitconv_op.BitConvCall), op.k
            n = int(op.w.ty.shape[0])
            per_channel = int(op.gamma.ty.shape[0]) > 1
            w = bitlinear_op.constant_value(op.w)
            trits = layouts.unpack_2bit(w, k) if op.layout == "2bit" else w
            int8 = op.layout == bitlinear_op.Q8
            if conv:  # kernel / stride / padding (top, left, bottom, right), e.g. "8x8/4 p0,0,0,0"
                g = op.geometry
                stored = conv_kernels.ConvLayout.of(g.channels, *g.kernel, n, op.fold.layout)  # as the kernel pads
                extra = {"op": "conv2d", "conv": f"{g.kernel[0]}x{g.kernel[1]}/{g.stride[0]}x{g.stride[1]} p"
                                                   + ",".join(str(p) for p in g.padding),
                         "bytes": stored.groups * stored.o16 * 4}
            layers.append({"name": f"{'bitconv' if conv else 'bitlinear'}{len(layers)}", "index": len(layers),
                           **(extra if conv else {}), "in": k, "out": n,
                           "shape": [n, k], "precision": "int8" if int8 else "ternary",
                           "activation": op.activation, "layout": op.layout,
                           "scale": "per_channel" if per_channel else "per_tensor",
                           "weight_bits_per_param": 8 if int8 else layouts.bits_per_weight(op.layout),
                           "zero_fraction": round(float(np.mean(trits == 0)), 4)})
    return layers


def kernel_keys(loaded, per_channel: bool = False) -> list:
    """The BitLinear kernels a policy compiles to (for `bitrl-compile tune`), one per distinct shape."""
    from bitrl_compile.targets import kernel_spec
    from bitrl_compile.targets.tuning import KernelKey

    quantized = passes(None, kernel_spec(None), per_channel=per_channel, until=QUANTIZED)(to_relax(loaded))
    layers = bitlinear_layers(quantized)  # all ternary here: the int8 kernels of mixed precision are not tuned
    return list(dict.fromkeys(KernelKey(layer["in"], layer["out"], layer["activation"],
                                        layer["scale"] == "per_channel") for layer in layers
                                if layer.get("op") != "conv2d"))  # convolutions: one hand-written schedule


# ------------------------------------------------------------------------------------ compile

def runtime_library(target) -> bytes:
    """The target architecture's libtvm_runtime.so, to bundle with an artifact."""
    from bitrl_compile.runtime.policy import host_arch
    from bitrl_compile.runtime.tvm_runtime import find_libtvm_runtime

    if target.arch == host_arch():
        path = find_libtvm_runtime()
        if path is None:
            raise CompileError("libtvm_runtime.so not found to bundle; install apache-tvm")
        return path.read_bytes()
    if target.arch == "aarch64":
        from bitrl_compile.devices import ensure_aarch64_python

        return ensure_aarch64_python().libtvm_runtime.read_bytes()  # from the aarch64 apache-tvm wheel
    raise CompileError(f"cannot bundle a TVM runtime for {target.arch} from this {host_arch()} machine")


def int8_quantizer(mod, per_channel: bool = False) -> Callable:
    """precision.Quantize for a float Relax module: int8 layer indices -> the quantized module (after QUANTIZED)."""
    from bitrl_compile.targets import kernel_spec

    def quantize(int8_layers):
        return passes(None, kernel_spec(None), per_channel=per_channel, until=QUANTIZED,
                      int8_layers=tuple(int8_layers))(mod)

    return quantize


def auto_int8_layers(loaded, observations: np.ndarray | None = None, *, per_channel: bool = False,
                     tolerance: float | None = None, mod=None, log: Callable[[str], None] = lambda s: None):
    """`--int8-layers auto`: precision.choose_int8_layers on `observations` (raw, as the policy takes them: e.g.
    the states the original visits; default CALIBRATION observations of reference.check_observations). Returns
    a precision.Choice."""
    from bitrl_compile import precision, reference
    from bitrl_compile.runtime.policy import normalization, prepare_observations

    mod = mod if mod is not None else to_relax(loaded)
    obs = observations if observations is not None else reference.check_observations(loaded.input, CALIBRATION)
    x, _ = prepare_observations(loaded.input, obs, normalization(loaded.input))
    try:
        fp32 = precision.network_outputs(mod, x)
    except NotImplementedError as e:
        raise CompileError(f"--int8-layers auto cannot measure this policy ({first_line(e)}); name the layers, "
                           "e.g. --int8-layers first,last") from None
    quantize = int8_quantizer(mod, per_channel)
    n_layers = len(bitlinear_layers(quantize(())))
    choice = precision.choose_int8_layers(quantize, n_layers, x, fp32, loaded.output,
                                          precision.TOLERANCE if tolerance is None else tolerance)
    ranking = ", ".join(f"{r['index']}: {r['gain']:+.3g}" for r in choice.ranking)
    log(f"int8 layers (auto, on {len(x)} observations): {choice.layers or 'none'}, output error "
        f"{choice.error:.3g} ({'within' if choice.reached else 'NOT within'} the tolerance"
        f"{'' if choice.reached else ', the best of the ranking'}); relative error removed per layer: {ranking}")
    return choice


CALIBRATION = 256  # observations for --int8-layers auto without the states of an environment


def compile_policy(loaded, target_name: str, output: str | os.PathLike, *, per_channel: bool = False,
                   force: bool = False, bundle_runtime: bool = False, tuning_db: str | os.PathLike | None = None,
                   tuning: bool = True, log: Callable[[str], None] = lambda s: None,
                   measure: Callable[[dict, dict, object, Path], dict | None] | None = None,
                   int8_layers=None, calibration: np.ndarray | None = None) -> CompiledPolicy:
    """Compile a LoadedPolicy for a target into a policy.bitrl artifact at `output`.

    bundle_runtime adds the target's libtvm_runtime.so (3 MB), so the device needs only
    `pip install apache-tvm-ffi numpy`. Kernels take their schedule from the target's tuning
    database (`targets/tuned/<target>.json`, or the one in the folder `tuning_db`) where it has a
    record for them, else the default schedule; tuning=False always uses the default. `measure(manifest, members,
    quantized, output)`, run after the check and before writing, returns the manifest's "fidelity" record
    (bitrl_compile.fidelity.compile_hook) or None. `int8_layers`: layer indices (negative from the end) kept in
    int8 (mixed precision), or "auto" (`auto_int8_layers` on the raw observations `calibration`)."""
    import tvm

    from bitrl_compile import reference, targets
    from bitrl_compile.passes.legalize_bitlinear import kernel_schedules
    from bitrl_compile.targets import conv_kernels
    from bitrl_compile.targets import tuning as tuning_db_mod

    target = targets.get_target(target_name)
    targets.check_toolchain(target)
    output = Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    where = f"{loaded.source} policy"
    try:
        check_specs(loaded.input, loaded.output, where)
    except ValueError as e:
        raise CompileError(str(e).splitlines()[0]) from None
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    mod = to_relax(loaded)
    timings["import"] = time.perf_counter() - t0
    log(f"imported {loaded.source} policy into Relax ({len(mod['main'].body.blocks[0].bindings)} ops)")

    t0 = time.perf_counter()
    tvm_target = targets.tvm_target(target)
    spec = targets.kernel_spec(tvm_target)  # the target's kernel, resolved once for this compile
    schedules = tuning_db_mod.TunedSchedules(tuning_db_mod.database_path(target, tvm_target, tuning_db)) \
        if tuning else None
    if isinstance(int8_layers, str):
        if int8_layers != "auto":
            raise CompileError(f"int8_layers {int8_layers!r}: expected 'auto' or a list of layer indices")
        int8_layers = auto_int8_layers(loaded, calibration, per_channel=per_channel, mod=mod, log=log).layers
    quantized, lowered, params = run_passes(mod, tvm_target, spec, per_channel=per_channel, schedules=schedules,
                                            specs=(loaded.input, loaded.output), int8_layers=tuple(int8_layers or ()))
    del mod  # the float module's constants (a float32 copy of every weight, unless the caller holds them)
    plans = entry_plans(lowered, log)
    _check_output_width(loaded.output, plans, where)
    layers = bitlinear_layers(quantized)
    if not layers:
        raise CompileError("the policy has no linear layer with constant weights to ternarize")
    for layer in layers:
        if layer["zero_fraction"] == 1.0:
            warnings.warn(f"{layer['name']} ({layer['in']} -> {layer['out']}) has only zero weights after "
                          "ternarization; it will output its bias alone. Check the model.", stacklevel=2)
    kernel_table = kernel_schedules(lowered)
    untuned = [k for k in kernel_table if k["schedule"] != "tuned"]
    log(f"{len(kernel_table)} kernel(s): {len(kernel_table) - len(untuned)} tuned, {len(untuned)} with the default "
        "schedule" + (f" ({untuned[0].get('reason', 'tuning off')}; `bitrl-compile tune MODEL --target "
                      f"{target.name}` tunes them)" if untuned and tuning else ""))
    params, weight_layouts = store_weights(lowered, params)
    for layer in layers:  # ternary: stored base-3, unpacked at load into the kernel's tiles; int8: stored as is
        n, k = layer["shape"]
        if layer.get("op") == "conv2d":  # convolutions: int8 in the kernel's layout (g4o4, padded), stored as is
            layer.update(layout="int8", compute_layout=conv_kernels.LAYOUT, weight_bits_per_param=8)
        elif layer["precision"] == "int8":
            layer.update(layout="int8", compute_layout="q8", bytes=n * k)
        else:
            layer.update(layout="base3", compute_layout=spec.layout, bytes=n * -(-k // 5),
                         weight_bits_per_param=layouts.bits_per_weight("base3"))
    timings["passes"] = time.perf_counter() - t0
    int8 = [layer["index"] for layer in layers if layer["precision"] == "int8"]
    if sorted({i % len(layers) for i in int8_layers or ()}) != int8:  # ternarize counted the layers the same way
        raise CompilerBug(f"int8 layers {int8} are not the requested {list(int8_layers)}; this is a bug, please "
                          "report it")
    log(f"ternarized {len(layers) - len(int8)} linear layers into {spec.isa} kernels"
        + (f", kept {len(int8)} in int8 (layers {int8})" if int8 else "") + f"; building for {target.name} "
        f"({target.device})")

    t0 = time.perf_counter()
    try:
        executable = tvm.compile(lowered, target=tvm_target)
    except Exception as e:
        raise CompileError(f"TVM could not compile the policy for {target.name}: {first_line(e)}") from e
    missing = [c["func"] for plan in plans.values() for c in plan["calls"]
               if not executable.mod.imports[0].implements_function(c["func"])]
    if missing:  # a TVM pass renamed or merged a kernel after legalisation
        raise CompileError(f"kernels {sorted(set(missing))} of the entry points are not in the compiled library; "
                           "this is a bug, please report it")
    with tempfile.TemporaryDirectory(prefix="bitrl-") as tmp:
        lib_path = Path(tmp) / art.LIB
        if target.cc:
            from tvm.support import cc as tvm_cc

            executable.export_library(str(lib_path), fcompile=tvm_cc.cross_compiler(target.cc))
        else:
            executable.export_library(str(lib_path))
        lib_bytes = lib_path.read_bytes()
    timings["build"] = time.perf_counter() - t0
    log(f"built the {target.name} library ({len(lib_bytes)} bytes)")

    manifest = build_manifest(loaded, target, tvm_target, targets.cpu_flags_needed(target, spec), layers, params)
    manifest["weights"] = weight_layouts
    manifest["entry_points"] = plans
    manifest["vm_params"] = vm_params(lowered)
    manifest["batch"] = batch_bounds(lowered)
    manifest["kernels"] = kernel_table
    members = {art.LIB: lib_bytes, art.PARAMS: safetensors_np.dumps(params)}
    if bundle_runtime:
        members[art.RUNTIME] = runtime_library(target)
    t0 = time.perf_counter()
    try:  # run the artifact once against the numpy reference; nothing is written if it fails
        log(reference.check_artifact(manifest, members, quantized, output, layers := _layers(loaded, lowered)))
    except reference.CheckFailed as e:  # our bug (or TVM's), not the user's input: an internal error, exit 3
        raise CompilerBug(str(e)) from None
    timings["check"] = time.perf_counter() - t0
    if measure is not None:
        t0 = time.perf_counter()
        record = measure(manifest, members, quantized, output)
        if record:
            manifest["fidelity"] = record
        timings["fidelity"] = time.perf_counter() - t0
    art.write_artifact(output, manifest, members, force=force)
    log(f"wrote {output} ({output.stat().st_size} bytes)")
    return CompiledPolicy(output, manifest, quantized, params, timings, layers)


def _layers(loaded, lowered) -> dict | None:
    """What the check needs to run each layer of a BitNet backbone alone (`reference.check_artifact`): its
    BitLinear calls in order with their gamma parameters, and how many make a layer."""
    from bitrl_compile.passes.legalize_bitlinear import gamma_params

    config = getattr(getattr(loaded.module, "model", None), "config", None)
    depth = int(getattr(config, "num_hidden_layers", 0) or 0) if loaded.source == "bitnet" else 0
    ops = gamma_params(lowered) if depth else []
    if not ops or len(ops) % depth:
        return None
    return {"ops": ops, "window": len(ops) // depth}


def with_progress(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` with each line prefixed by the time since this call and the process's resident and peak memory
    (/proc/self/status; omitted where there is none): `[  12.3 s, RSS 1.52 GiB, peak 4.10 GiB] ...`. The CLI's
    compile log (a 2B-parameter backbone takes minutes and GiBs: each stage shows both)."""
    t0 = time.perf_counter()

    def progress(line: str) -> None:
        mem = {}
        try:
            with open("/proc/self/status") as f:
                mem = {k: int(v.split()[0]) / 2**20 for k, v in (ln.split(":", 1) for ln in f if ln.startswith(
                    ("VmRSS:", "VmHWM:")))}
        except (OSError, ValueError):
            pass
        usage = f", RSS {mem['VmRSS']:.2f} GiB, peak {mem['VmHWM']:.2f} GiB" if len(mem) == 2 else ""
        log(f"[{time.perf_counter() - t0:6.1f} s{usage}] {line}")

    return progress


def _check_output_width(output_spec: dict, plans: dict, where: str) -> None:
    """The network's output width (the forward entry point's [batch, ...] output) against the output spec."""
    forward = plans.get("forward")
    if forward is None:
        return
    shape = forward["outputs"][0]["shape"][1:]
    try:
        check_output_size(output_spec, int(np.prod([int(d) for d in shape])), where)
    except ValueError as e:
        raise CompileError(str(e).splitlines()[0]) from None


def entry_plans(lowered, log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """manifest["entry_points"]: each entry point's kernel calls (runtime/plan.py runs them without the VM)."""
    from bitrl_compile.passes.entry_points import ENTRY_POINTS, NoPlan, plan_of

    plans = {}
    for name in ENTRY_POINTS:
        if any(gv.name_hint == name for gv in lowered.functions):
            try:
                plans[name] = plan_of(lowered, name)
            except NoPlan as e:
                log(f"entry point {name} runs through the Relax VM ({e})")
    return plans


def vm_params(lowered) -> dict[str, list[str]]:
    """manifest["vm_params"]: the parameters each Relax function takes after its inputs, in order."""
    from tvm import relax

    return {gv.name_hint: [v.name for v in f.params[int(f.attrs["num_input"]):]]
            for gv, f in lowered.functions.items() if isinstance(f, relax.Function)}


def batch_bounds(lowered) -> dict[str, int]:
    """manifest["batch"]: the batch sizes the compiled functions accept."""
    attrs = lowered["main"].attrs
    batch = lowered["main"].params[0].ty.shape[0]
    if not hasattr(batch, "name"):  # a fixed batch
        return {"min": int(batch), "max": int(batch)}
    lower = attrs.get("tir_var_lower_bound", {}).get(batch.name, 1)
    upper = attrs.get("tir_var_upper_bound", {}).get(batch.name)
    return {"min": int(lower), "max": int(upper) if upper is not None else None}


def build_manifest(loaded, target, tvm_target, cpu_features, layers, params) -> dict:
    import tvm

    n_weights = sum(layer["in"] * layer["out"] for layer in layers if layer.get("precision") != "int8")
    n_int8 = sum(layer["in"] * layer["out"] for layer in layers if layer.get("precision") == "int8")
    return {
        "target": {"name": target.name, "device": target.device, "arch": target.arch,
                   "tvm": str(tvm_target), "cpu_features": list(cpu_features)},
        "versions": {"bitrl_compile": __version__, "tvm": tvm.__version__,
                     "python": platform.python_version()},
        "source": {"format": loaded.source, "description": loaded.description},
        **({"recovery": loaded.recovery} if getattr(loaded, "recovery", None) else {}),
        "input": loaded.input,
        "output": loaded.output,
        "layers": layers,
        "params": list(params),
        "stats": {"ternary_weights": n_weights, **({"int8_weights": n_int8} if n_int8 else {}),
                  "param_bytes": int(sum(v.nbytes for v in params.values()))},
    }
