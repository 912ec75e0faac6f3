"""The manifest's structure: one check, run by `read_artifact` right after parsing, of every field a reader uses.

Behind it the readers (runtime.load, runtime/plan.py, runtime/weights.py, `bitrl-compile inspect`, devices) index
the manifest without guarding each access: a malformed manifest is refused here, in one line naming the field
("manifest weights.p0.shape has 1 value, expected [N, K]"), instead of a KeyError or TypeError three calls later.
Hashes catch accidents; an edit with recomputed hashes (unsigned artifacts: docs/security.md) reaches this check.
runtime/capi/bitrl.c checks the same fields the C API reads, with the same limits.

The fields (required: target, input, output, params; the rest may be absent in older or hand-made artifacts):

    target        {"arch": str, "name": str, "device": str, "tvm": str, "cpu_features": [str, ...]}
    input/output  the specs of runtime/specs.py (its checks, one home; a Dict observation's keys too)
    params        [name, ...], unique strings: the parameters of params.safetensors the library takes
    weights       {param: {"storage": "base3", "compute": "tiles<NL>x<KG>" | "lut<NL>", "shape": [N, K]}}
    entry_points  {name: plan} with the plan's form of runtime/plan.py (inputs, outputs, buffers, calls)
    vm_params     {function: [param, ...]}
    batch         {"min": int, "max": int | null}, 1 <= min <= max <= 2^30
    kernels       [{"kernel": str, "isa": str, "layout": str, "schedule": str, "reason": str, "in": int, "out": int,
                    "knobs": {str: number}, "gemv"/"gemm": {"batch": int, "us": number, "default_us": number}}]
    layers        [{"name": str, "in": int, "out": int, "activation": str, "layout": str, "scale": str, ...,
                    optional: "index": int, "shape": [N, K], "precision": "ternary" | "int8", "bytes": int (the
                    weight's stored bytes)}]; int8 layers (mixed precision) keep their weights as int8 [N, K]
                    parameters, not listed in "weights"
    versions, source  objects of strings; stats  {"ternary_weights": int, "int8_weights": int, "param_bytes": int}
    recovery      str: how the compiled file was made ternary-ready ("distill": trainers/distill.py)
    fidelity      {"env": str, "states": int, "agreement", "weighted": number in [0, 1], "engine", "kind", "rule": str,
                   "q_gap", "q_error", "error", "return", "return_fp32", "return_random", "score": number,
                   "score_error": number >= 0, "episodes": int} (bitrl_compile/fidelity.py: the ternary policy
                   against the original on the states the original visits; readers only print it)

Pure Python but for the specs (runtime/specs.py, numpy): nothing here allocates by a declared size.
"""

from __future__ import annotations

import math
import numbers
import re

from .specs import check_input_spec, check_output_size, check_output_spec

# The C API's limits (runtime/capi/bitrl.c, params.c): the two readers refuse the same manifests.
MAX_DIMS = 8  # BITRL_MAX_DIMS
MAX_DIM = 1 << 32  # one dimension of a plan's tensor
MAX_ELEMENTS = 1 << 40  # one plan tensor at the largest batch
MAX_BATCH = 1 << 30
DEFAULT_BATCH_MAX = 1 << 20  # an artifact without "batch"
MAX_WEIGHT_DIM = 1 << 24  # N and K of a weight
MAX_TILE = 4096  # NL and KG of a compute layout
MAX_NAME = 200  # a function or parameter name
DTYPES = ("float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "bool")
_FUNC = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")  # a C symbol: lib.so exports __tvm_ffi_<func>
_SLOT = re.compile(r"(input|output|buffer):([0-9]{1,9})")
_LAYOUT = re.compile(r"tiles([0-9]{1,4})x([0-9]{1,4})|lut([0-9]{1,4})")
PRECISIONS = ("ternary", "int8")  # a layer's weights (mixed precision: passes/ternarize.py)
_SIMPLE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class ManifestError(ValueError):
    """A manifest field of the wrong structure: "manifest <field path> <problem>" (one line)."""


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _key(name: str) -> str:
    """A key as it appears in a field path: plain when simple, quoted (escaped, cut) otherwise."""
    return name if _SIMPLE.fullmatch(name) else _short(name)


class _Missing:
    """The value of a field that is absent (named "missing" in messages, where None is "null")."""


MISSING = _Missing()


def _field(obj: dict, key: str):
    return obj.get(key, MISSING)


def _kind(value) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__)


def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"manifest {where} {problem}")


def _obj(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, f"is not an object ({_kind(value)})")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise _fail(where, f"is not a list ({_kind(value)})")
    return value


def _str(value, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"is not a string ({_kind(value)})")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value, where: str, low: int = 0, high: int = 1 << 62) -> int:
    if not _is_int(value):
        raise _fail(where, f"is not an integer ({_kind(value)})")
    if not low <= value <= high:
        raise _fail(where, f"is {_short(value)}, not in [{low}, {high}]")
    return value


def _number(value, where: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _fail(where, f"is not a number ({_kind(value)})")


def _optional(manifest: dict, key: str, check) -> None:
    if key in manifest:
        check(manifest[key], key)


def _strings(obj: dict, keys: tuple[str, ...], where: str) -> None:
    """The fields `keys` of an object are strings where present."""
    for key in keys:
        if key in obj:
            _str(obj[key], f"{where}.{key}")


# ------------------------------------------------------------------------------------------------ fields

def _target(value, where: str) -> None:
    target = _obj(value, where)
    _str(_field(target, "arch"), f"{where}.arch")
    _strings(target, ("name", "device", "tvm"), where)
    if "cpu_features" in target:
        for i, flag in enumerate(_list(target["cpu_features"], f"{where}.cpu_features")):
            _str(flag, f"{where}.cpu_features[{i}]")


def _params(value, where: str) -> list[str]:
    names = _list(value, where)
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise _fail(f"{where}[{i}]", f"is {_short(name)}, not a parameter name (a string of 1 to {MAX_NAME} "
                                         "characters)")
        if name in seen:
            raise _fail(f"{where}[{i}]", f"repeats the name {_key(name)}")
        seen.add(name)
    return names


def _weights(value, where: str, params: set[str]) -> None:
    for name, spec in _obj(value, where).items():
        at = f"{where}.{_key(name)}"
        if name not in params:
            raise _fail(where, f"lists {_key(name)}, which is not in manifest params")
        spec = _obj(spec, at)
        if _str(_field(spec, "storage"), f"{at}.storage") != "base3":
            raise _fail(f"{at}.storage", f"is {_short(spec['storage'])}, expected 'base3'")
        layout = _LAYOUT.fullmatch(_str(_field(spec, "compute"), f"{at}.compute"))
        if layout is None or not all(0 < int(g) <= MAX_TILE for g in layout.groups() if g is not None):
            raise _fail(f"{at}.compute", f"is {_short(spec['compute'])}, not tiles<NL>x<KG> or lut<NL> with NL, KG "
                                         f"in [1, {MAX_TILE}]")
        shape = _list(_field(spec, "shape"), f"{at}.shape")
        if len(shape) != 2:
            raise _fail(f"{at}.shape", f"has {len(shape)} value(s), expected [N, K]")
        for d, size in enumerate(shape):
            _int(size, f"{at}.shape[{d}]", 1, MAX_WEIGHT_DIM)


def _tensor(value, where: str, batch_max: int, io: bool) -> int:
    """A plan tensor {"dtype", "shape"[, "name"]}; inputs and outputs are ["batch", sizes...]. Returns its rank."""
    tensor = _obj(value, where)
    dtype = _field(tensor, "dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = _short(dtype) if isinstance(dtype, str) else _kind(dtype)
        raise _fail(f"{where}.dtype", f"is {shown}, not one of {', '.join(DTYPES)}")
    shape = _list(_field(tensor, "shape"), f"{where}.shape")
    if len(shape) > MAX_DIMS or (io and not shape):
        raise _fail(f"{where}.shape", f"has {len(shape)} dimensions, expected {'1' if io else '0'} to {MAX_DIMS}")
    count = 1
    for d, size in enumerate(shape):
        at = f"{where}.shape[{d}]"
        if io and (d == 0) != (size == "batch"):
            raise _fail(f"{where}.shape", f"is {_short(shape)}, not [\"batch\", sizes...]")
        if size != "batch":
            _int(size, at, 0, MAX_DIM)
        count *= batch_max if size == "batch" else size
    if count > MAX_ELEMENTS:
        raise _fail(f"{where}.shape", f"{_short(shape)} holds more than {MAX_ELEMENTS} values at batch {batch_max}")
    if "name" in tensor:
        _str(tensor["name"], f"{where}.name")
    return len(shape)


def _view(plan: dict, i: int, at: str) -> None:
    """A buffer's "view" (runtime/plan.py): an input or a buffer that is no view, of its dtype and number of values."""
    view, tensor = plan["buffers"][i]["view"], plan["buffers"][i]
    slot = _SLOT.fullmatch(view) if isinstance(view, str) else None
    if slot is None or slot.group(1) == "output":
        raise _fail(at, f"is {_short(view) if isinstance(view, str) else _kind(view)}, not input:I or buffer:I")
    items = plan[slot.group(1) + "s"]
    if int(slot.group(2)) >= len(items) or "view" in items[int(slot.group(2))]:
        raise _fail(at, f"is {_short(view)}, which does not exist or is a view itself")
    base = items[int(slot.group(2))]

    def size(t):  # (dtype, number of batch dimensions, product of the others)
        return t["dtype"], t["shape"].count("batch"), math.prod(d for d in t["shape"] if d != "batch")

    if size(base) != size(tensor):
        raise _fail(at, f"is {_short(view)}, whose dtype or number of values differs from the view's")


def _plan(value, where: str, params: set[str], batch_max: int) -> None:
    """One entry point's plan (runtime/plan.py): every argument of every call refers to something that exists."""
    plan = _obj(value, where)
    counts = {}
    for part in ("inputs", "outputs", "buffers"):
        if part == "buffers" and part not in plan:
            counts[part] = 0
            continue
        items = _list(_field(plan, part), f"{where}.{part}")
        if part != "buffers" and not items:
            raise _fail(f"{where}.{part}", "is empty")
        for i, tensor in enumerate(items):
            _tensor(tensor, f"{where}.{part}[{i}]", batch_max, io=part != "buffers")
        counts[part] = len(items)
    for i, tensor in enumerate(plan.get("buffers") or []):
        if "view" in tensor:
            _view(plan, i, f"{where}.buffers[{i}].view")
    for k, call in enumerate(_list(_field(plan, "calls"), f"{where}.calls")):
        at = f"{where}.calls[{k}]"
        call = _obj(call, at)
        if not _FUNC.fullmatch(_str(_field(call, "func"), f"{at}.func")):
            raise _fail(f"{at}.func", f"is {_short(call['func'])}, not a function name")
        for j, arg in enumerate(_list(_field(call, "args"), f"{at}.args")):
            ref = _str(arg, f"{at}.args[{j}]")
            slot = _SLOT.fullmatch(ref)
            if slot is not None:
                part = slot.group(1) + "s"
                if int(slot.group(2)) >= counts[part]:
                    raise _fail(f"{at}.args[{j}]", f"is {_short(ref)}, but {where} has {counts[part]} {part}")
            elif not ref.startswith("param:"):
                raise _fail(f"{at}.args[{j}]", f"is {_short(ref)}, not input:I, output:I, buffer:I or param:NAME")
            elif ref[6:] not in params:
                raise _fail(f"{at}.args[{j}]", f"is {_short(ref)}, a parameter not in manifest params")


def _batch(value, where: str) -> int:
    """The largest batch (DEFAULT_BATCH_MAX when unbounded)."""
    batch = _obj(value, where)
    low = _int(_field(batch, "min"), f"{where}.min", 1, MAX_BATCH)
    high = _field(batch, "max")
    if high is None:
        return DEFAULT_BATCH_MAX
    return _int(high, f"{where}.max", low, MAX_BATCH)


def _vm_params(value, where: str, params: set[str]) -> None:
    for function, names in _obj(value, where).items():
        at = f"{where}.{_key(function)}"
        for i, name in enumerate(_list(names, at)):
            if _str(name, f"{at}[{i}]") not in params:
                raise _fail(f"{at}[{i}]", f"is {_short(name)}, a parameter not in manifest params")


def _kernels(value, where: str) -> None:
    for i, kernel in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        kernel = _obj(kernel, at)
        _strings(kernel, ("kernel", "isa", "layout", "schedule", "reason"), at)
        for key in ("in", "out"):
            if key in kernel:
                _int(kernel[key], f"{at}.{key}")
        if "knobs" in kernel:
            for name, knob in _obj(kernel["knobs"], f"{at}.knobs").items():
                _number(knob, f"{at}.knobs.{_key(name)}")
        for shape in ("gemv", "gemm"):
            if shape in kernel:
                tuned = _obj(kernel[shape], f"{at}.{shape}")
                _int(_field(tuned, "batch"), f"{at}.{shape}.batch")
                _number(_field(tuned, "us"), f"{at}.{shape}.us")
                _number(_field(tuned, "default_us"), f"{at}.{shape}.default_us")


def _layers(value, where: str) -> None:
    for i, layer in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        layer = _obj(layer, at)
        _str(_field(layer, "name"), f"{at}.name")
        _int(_field(layer, "in"), f"{at}.in", 0, MAX_WEIGHT_DIM)
        _int(_field(layer, "out"), f"{at}.out", 0, MAX_WEIGHT_DIM)
        _strings(layer, ("activation", "layout", "compute_layout", "scale"), at)
        if "index" in layer:
            _int(layer["index"], f"{at}.index", 0, MAX_WEIGHT_DIM)
        if "bytes" in layer:
            _int(layer["bytes"], f"{at}.bytes", 0, 1 << 62)
        if "precision" in layer and layer["precision"] not in PRECISIONS:
            raise _fail(f"{at}.precision", f"is {_short(layer['precision'])}, not one of {', '.join(PRECISIONS)}")
        if "shape" in layer:
            shape = _list(layer["shape"], f"{at}.shape")
            if len(shape) != 2:
                raise _fail(f"{at}.shape", f"has {len(shape)} value(s), expected [N, K]")
            for d, size in enumerate(shape):
                _int(size, f"{at}.shape[{d}]", 0, MAX_WEIGHT_DIM)
        for key in ("weight_bits_per_param", "zero_fraction"):
            if key in layer:
                _number(layer[key], f"{at}.{key}")


def _texts(value, where: str) -> None:
    for key, text in _obj(value, where).items():
        _str(text, f"{where}.{_key(key)}")


def _stats(value, where: str) -> None:
    stats = _obj(value, where)
    for key in ("ternary_weights", "int8_weights", "param_bytes"):
        if key in stats:
            _int(stats[key], f"{where}.{key}")


def _fidelity(value, where: str) -> None:
    record = _obj(value, where)
    _str(_field(record, "env"), f"{where}.env")
    _int(_field(record, "states"), f"{where}.states", 1)
    for key in ("agreement", "weighted"):
        if key == "agreement" or key in record:
            share = _field(record, key)
            _number(share, f"{where}.{key}")
            if not 0 <= share <= 1:
                raise _fail(f"{where}.{key}", f"is {_short(share)}, not in [0, 1]")
    _strings(record, ("engine", "kind", "rule"), where)
    for key in ("q_gap", "q_error", "error", "return", "return_fp32", "return_random", "score", "score_error"):
        if key in record:
            _number(record[key], f"{where}.{key}")
            if not math.isfinite(record[key]):
                raise _fail(f"{where}.{key}", f"is {_short(record[key])}, not a finite number")
    if record.get("score_error", 0) < 0:
        raise _fail(f"{where}.score_error", f"is {_short(record['score_error'])}, not a standard error (>= 0)")
    if "episodes" in record:
        _int(record["episodes"], f"{where}.episodes", 1)


def _state_io(entry_points: dict, recurrent: dict | None) -> None:
    """Entry points return one tensor, or take and return the state a recurrent input spec declares."""
    for name, plan in entry_points.items():
        ins, outs = plan["inputs"], plan["outputs"]
        want = (2 if name == "sample" else 1) + (2 if recurrent is not None else 0)  # obs[, state, start][, noise]
        if name in ("forward", "act", "sample", "features") and len(ins) != want:
            raise _fail(f"entry_points.{name}", f"takes {len(ins)} inputs, not {want}")
        if recurrent is None:
            if len(outs) != 1:
                raise _fail(f"entry_points.{name}", f"returns {len(outs)} tensors; only a recurrent policy's entry "
                            "points return a state (input recurrent)")
            continue
        state = ["batch", recurrent["state_size"]]
        if len(ins) < 3 or ins[1]["shape"] != state or ins[2]["shape"] != ["batch"] or len(outs) != 2 \
                or outs[1]["shape"] != state or any(t["dtype"] != "float32" for t in (ins[1], ins[2], outs[1])):
            raise _fail(f"entry_points.{name}", f"does not take (obs, state, episode_start) and return (result, "
                        f"state) with the {recurrent['state_size']} float32 state values of input recurrent")


def _specs(manifest: dict) -> None:
    """runtime/specs.py's checks of input and output, and forward's output width against the output spec."""
    try:
        check_input_spec(manifest.get("input"), "input")
        check_output_spec(manifest.get("output"), "output")
        _state_io(manifest.get("entry_points") or {}, manifest["input"].get("recurrent"))
        forward = (manifest.get("entry_points") or {}).get("forward")
        if forward is not None:
            shape = forward["outputs"][0]["shape"]  # checked: ["batch", sizes...]
            check_output_size(manifest["output"], math.prod(shape[1:]), "output")
    except ManifestError:
        raise
    except ValueError as e:
        raise ManifestError(f"manifest {str(e).splitlines()[0]}") from None


def check_manifest(manifest: dict) -> None:
    """ManifestError (one line) unless every field a reader uses has its structure (the module's docstring).
    `manifest` is an object whose format, format_version and members artifact.py has checked."""
    _target(_field(manifest, "target"), "target")
    params = set(_params(_field(manifest, "params"), "params"))
    _optional(manifest, "weights", lambda v, w: _weights(v, w, params))
    batch_max = _batch(manifest["batch"], "batch") if "batch" in manifest else DEFAULT_BATCH_MAX
    if "entry_points" in manifest:
        for name, plan in _obj(manifest["entry_points"], "entry_points").items():
            if not _FUNC.fullmatch(name):
                raise _fail("entry_points", f"holds {_short(name)}, not an entry point name")
            _plan(plan, f"entry_points.{name}", params, batch_max)
    _optional(manifest, "vm_params", lambda v, w: _vm_params(v, w, params))
    _optional(manifest, "kernels", _kernels)
    _optional(manifest, "layers", _layers)
    _optional(manifest, "versions", _texts)
    _optional(manifest, "source", _texts)
    _optional(manifest, "stats", _stats)
    _optional(manifest, "fidelity", _fidelity)
    _optional(manifest, "recovery", _str)
    _specs(manifest)
