"""Validation of a manifest's input and output specs, at compile and at load: one home for what a spec may say.

A spec that is not checked turns into silently wrong actions (a negative eps, NaN or inverted action bounds, a
complex observation whose imaginary part is dropped) or into an allocation of absurd size (a declared shape of
10^12 values). Every problem raises ValueError with one line naming the field and the fix.

The forms (written by the frontends, read by `runtime.policy` and `passes.entry_points`):

    input  = {"shape": [...], "dtype": "float32", "preprocess": "none" | "onehot" | "image" | "text",
              "n": N (onehot), "text": {"decimals": d, "length": L} (text),
              "normalize": None | {"mean": [...], "var": [...], "eps": 1e-8, "clip": 10.0 | None}}
           | a Dict observation (SB3 MultiInputPolicy's CombinedExtractor): the same, with "shape": [total],
             "preprocess": "none" and
             "kind": "dict", "keys": [{"name": str, "shape": [...], "dtype": str, "preprocess": "none" | "image"
                                       | "onehot", "n": N (onehot), "normalize": bool}, ...]
             The network (and the artifact's entry points, and the C API) takes one flat float32 [B, total]: each
             key's array flattened (C order), concatenated in the order of "keys", whose sizes add up to total;
             "normalize" (the folded statistics of the normalised keys, mean 0 / var 1 for the others) is over
             that flat vector, and a key's "normalize" says whether its values are normalised. A "onehot" key (a
             Discrete(N) space) has shape [1]: its one value in the row is the index, a whole number in [0, N),
             which the network one-hot encodes itself; it is never normalised.
           | a recurrent policy (an LSTM actor: sb3-contrib RecurrentPPO) adds
             "recurrent": {"layers": L, "hidden": H, "state_size": 2 L H}: every entry point takes (obs, state
             [B, state_size], episode_start [B]) and returns (its result, the next state); the state row is h of
             layers 0..L-1, then c of layers 0..L-1, and episode_start 1 resets that row's state first
    output = {"kind": "discrete", "n": N, "outputs": "logits" | "q_values"}
           | {"kind": "continuous", "shape": [...], "low": [...], "high": [...], "squash": "tanh" | "clip" | "none",
              "log_std": [...] | None}
           | {"kind": "features", "dim": D}

Numpy only: the runtime stands alone.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

# Far beyond any MLP policy's observation or action (an Atari frame stack is 28,224 values), far below what
# would exhaust memory when the bounds are expanded or a buffer of that size is allocated for a batch.
MAX_VALUES = 1 << 20
SQUASHES = ("tanh", "clip", "none")
PREPROCESSES = ("none", "onehot", "image", "text")
OUTPUT_KINDS = ("discrete", "continuous", "features")
INPUT_KINDS = ("flat", "dict")  # "flat" when absent
MAX_KEYS = 64  # keys of a Dict observation (runtime/capi/manifest.c: the same)
MAX_KEY_NAME = 200
# image: uint8 pixels whose /255 and CNN the compiled module holds; onehot: a Discrete key's index, one-hot encoded
# by the compiled module
KEY_PREPROCESSES = ("none", "image", "onehot")
# a key's dtype: the numpy names the frontends write (the C reader knows exactly these)
KEY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "bool")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_count(value) -> bool:
    """A positive int (numpy ints too), not a bool, float or string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def check_count(value, what: str, where: str, limit: int = MAX_VALUES) -> int:
    if not is_count(value):
        raise ValueError(f"{where}: {what} must be a positive integer, got {_short(value)}")
    if int(value) > limit:
        raise ValueError(f"{where}: {what} = {int(value)} is larger than the limit {limit}; check the model's spec")
    return int(value)


def check_shape(shape, what: str, where: str) -> tuple[int, ...]:
    """A non-empty list of positive ints whose product is at most MAX_VALUES."""
    if not isinstance(shape, (list, tuple)) or not shape or not all(is_count(d) for d in shape):
        raise ValueError(f"{where}: {what} must be a non-empty list of positive integers, got {_short(shape)}")
    size = math.prod(int(d) for d in shape)
    if size > MAX_VALUES:
        raise ValueError(f"{where}: {what} {list(shape)} has {size} values, more than the limit {MAX_VALUES}; "
                         "check the model's spec")
    return tuple(int(d) for d in shape)


def _floats(value, what: str, where: str, size: int | None) -> np.ndarray:
    """A number or a (nested) list of numbers -> float64 vector; refuses strings, complex numbers, wrong sizes."""
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise ValueError(f"{where}: {what} must be a list of numbers, got {_short(value)}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {what} is not a list of numbers ({e})") from None
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{where}: {what} must hold real numbers, got {_short(value)}")
    arr = arr.astype(np.float64).ravel()
    if size is not None and arr.size != size:
        raise ValueError(f"{where}: {what} has {arr.size} values, expected {size}")
    return arr


def check_real_dtype(dtype, where: str) -> None:
    """An observation dtype must be a real number type (a complex observation would lose its imaginary part)."""
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) and len(dtype) <= 32 else None
    except TypeError:
        dt = None
    if dt is None:
        raise ValueError(f"{where}: observation dtype {_short(dtype)} is not a numpy dtype; use float32")
    if dt == np.bool_ or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise ValueError(f"{where}: observation dtype {dt} is not a real number type; the policy takes real "
                         "observations (float32, int, uint8, bool): convert the env's observation space")


def check_normalize(norm, size: int | None, where: str) -> None:
    """mean/var finite lists of `size` values (any equal sizes when None), var >= 0, eps > 0, clip > 0 or None."""
    if not isinstance(norm, dict):
        raise ValueError(  # noqa: TRY004 - bad input, not a programming error
            f"{where}: normalisation must be an object {{\"mean\", \"var\", \"eps\", \"clip\"}}, "
            f"got {_short(norm)}")
    for key in ("mean", "var"):
        if key not in norm:
            raise ValueError(f"{where}: normalisation has no \"{key}\"; give the statistics' mean and var")
    mean = _floats(norm["mean"], "normalisation mean", where, size)
    var = _floats(norm["var"], "normalisation var", where, mean.size)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var < 0).any():
        raise ValueError(f"{where}: normalisation statistics must be finite with var >= 0; give the statistics "
                         "saved with the policy")
    eps = norm.get("eps", 1e-8)
    if not _real(eps) or not (math.isfinite(float(eps)) and float(eps) > 0):
        raise ValueError(f"{where}: normalisation eps must be a finite number > 0, got {_short(eps)}")
    clip = norm.get("clip")
    if clip is not None and (not _real(clip) or not (math.isfinite(float(clip)) and float(clip) > 0)):
        raise ValueError(f"{where}: normalisation clip must be a finite number > 0 or null, got {_short(clip)}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_input_spec(spec, where: str) -> None:
    if not isinstance(spec, dict):
        raise ValueError(  # noqa: TRY004 - bad input, not a programming error
            f"{where}: the input spec must be an object, got {type(spec).__name__}")
    shape = check_shape(spec.get("shape"), "observation shape", where)
    if "dtype" in spec:
        check_real_dtype(spec["dtype"], where)
    pre = spec.get("preprocess", "none")
    if pre not in PREPROCESSES:
        raise ValueError(f"{where}: input preprocess must be one of {list(PREPROCESSES)}, got {_short(pre)}")
    size = math.prod(shape)
    if pre == "onehot":
        n = check_count(spec.get("n"), "one-hot input n", where)
        if shape != (n,):
            raise ValueError(f"{where}: a one-hot input of n={n} must have shape [{n}], got {list(shape)}")
    if pre == "text":
        text = spec.get("text")
        if not isinstance(text, dict):
            raise ValueError(f"{where}: a text input needs \"text\": {{\"decimals\", \"length\"}}")
        size = check_count(text.get("length"), "text input length", where)
        decimals = text.get("decimals")
        if not isinstance(decimals, numbers.Integral) or isinstance(decimals, bool) or not 0 <= decimals <= 12:
            raise ValueError(f"{where}: text input decimals must be an integer in [0, 12], got {_short(decimals)}")
    if spec.get("normalize") is not None:
        check_normalize(spec["normalize"], size, where)
    kind = spec.get("kind", "flat")
    if kind not in INPUT_KINDS:
        raise ValueError(f"{where}: input kind must be one of {list(INPUT_KINDS)}, got {_short(kind)}")
    if kind == "dict":
        check_input_keys(spec, where)
    elif "keys" in spec:
        raise ValueError(f"{where}: input \"keys\" is only for a Dict observation (input kind \"dict\")")
    if spec.get("recurrent") is not None:
        check_recurrent(spec["recurrent"], where)


def check_recurrent(rec, where: str) -> None:
    """A recurrent policy's state: {"layers": L, "hidden": H, "state_size": 2 L H} (h of every layer, then c)."""
    if not isinstance(rec, dict):
        raise ValueError(  # noqa: TRY004 - bad input, not a programming error
            f"{where}: input recurrent must be an object {{layers, hidden, state_size}}, got {type(rec).__name__}")
    layers = check_count(rec.get("layers"), "recurrent layers", where, 64)
    hidden = check_count(rec.get("hidden"), "recurrent hidden size", where, 1 << 16)
    size = check_count(rec.get("state_size"), "recurrent state_size", where)
    if size != 2 * layers * hidden:
        raise ValueError(f"{where}: recurrent state_size is {size}, not 2 x {layers} layers x {hidden} (h and c of "
                         "every layer)")


def check_input_keys(spec: dict, where: str) -> None:
    """A Dict observation's keys: unique names, each a real-typed array; their sizes add up to the flat shape."""
    keys = spec.get("keys")
    if not isinstance(keys, list) or not keys or len(keys) > MAX_KEYS:
        raise ValueError(f"{where}: input keys must be a list of 1 to {MAX_KEYS} objects {{\"name\", \"shape\", "
                         f"\"dtype\"}}, got {_short(keys)}")
    shape = [int(d) for d in spec["shape"]]
    if len(shape) != 1 or spec.get("preprocess", "none") != "none":
        raise ValueError(f"{where}: a Dict observation is one flat vector (shape [total], preprocess none), got "
                         f"shape {shape} preprocess {_short(spec.get('preprocess'))}")
    names, total = set(), 0
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            raise ValueError(  # noqa: TRY004 - bad input, not a programming error
                f"{where}: input keys[{i}] must be an object {{\"name\", \"shape\", \"dtype\"}}, got {_short(key)}")
        name = key.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_KEY_NAME:
            raise ValueError(f"{where}: input keys[{i}].name must be a string of 1 to {MAX_KEY_NAME} characters, got "
                             f"{_short(name)}")
        if name in names:
            raise ValueError(f"{where}: input keys[{i}].name repeats the key {_short(name)}")
        names.add(name)
        total += math.prod(check_shape(key.get("shape"), f"input key {_short(name)} shape", where))
        if key.get("dtype", "float32") not in KEY_DTYPES:
            raise ValueError(f"{where}: input key {_short(name)} dtype must be one of {list(KEY_DTYPES)}, got "
                             f"{_short(key.get('dtype'))}")
        if key.get("preprocess", "none") not in KEY_PREPROCESSES:
            raise ValueError(f"{where}: input key {_short(name)} preprocess must be one of {list(KEY_PREPROCESSES)}, "
                             f"got {_short(key.get('preprocess'))}")
        if not isinstance(key.get("normalize", False), bool):
            raise ValueError(  # noqa: TRY004 - bad input, not a programming error
                f"{where}: input key {_short(name)} normalize must be true or false, got {_short(key.get('normalize'))}")
        if key.get("preprocess") == "onehot":
            _check_onehot_key(key, name, where)
    if total != shape[0]:
        raise ValueError(f"{where}: input keys hold {total} values in all but the observation shape is {shape}; "
                         "the keys' sizes must add up to it")


def _check_onehot_key(key: dict, name: str, where: str) -> None:
    """A Discrete key: n a positive int within the limit, one value (the index) in the row, not normalised."""
    n = check_count(key.get("n"), f"input key {_short(name)} one-hot n", where)
    if list(key["shape"]) != [1]:
        raise ValueError(f"{where}: input key {_short(name)} is one-hot (n={n}): its shape must be [1] (the index), "
                         f"got {_short(key['shape'])}")
    if key.get("normalize"):
        raise ValueError(f"{where}: input key {_short(name)} is one-hot (n={n}): its index cannot be normalised; "
                         "give statistics for the other keys only")


def check_output_spec(spec, where: str) -> None:
    if not isinstance(spec, dict):
        raise ValueError(  # noqa: TRY004 - bad input, not a programming error
            f"{where}: the output spec must be an object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "discrete":
        check_count(spec.get("n"), "the number of discrete actions n", where)
        outputs = spec.get("outputs", "logits")
        if outputs not in ("logits", "q_values"):
            raise ValueError(f"{where}: output \"outputs\" must be \"logits\" or \"q_values\", got {_short(outputs)}")
    elif kind == "continuous":
        size = math.prod(check_shape(spec.get("shape"), "action shape", where))
        squash = spec.get("squash", "clip")
        if squash not in SQUASHES:
            raise ValueError(f"{where}: output squash must be one of {list(SQUASHES)}, got {_short(squash)}")
        low = _floats(spec.get("low"), "action bound low", where, size)
        high = _floats(spec.get("high"), "action bound high", where, size)
        # tanh rescales into [low, high], which must be finite; clip and none accept an unbounded side (+-inf)
        finite = np.isfinite(low).all() and np.isfinite(high).all() if squash == "tanh" else \
            not (np.isnan(low).any() or np.isnan(high).any() or (low == np.inf).any() or (high == -np.inf).any())
        if not finite or (low > high).any():
            raise ValueError(f"{where}: action bounds must be finite with low <= high; got low={_short(low.tolist())} "
                             f"high={_short(high.tolist())}; fix the env's action space or the config's \"output\"")
        if spec.get("log_std") is not None:
            log_std = _floats(spec["log_std"], "log_std", where, size)
            if not np.isfinite(log_std).all():
                raise ValueError(f"{where}: log_std contains NaN or Inf; fix or retrain the model")
    elif kind == "features":
        check_count(spec.get("dim"), "features dim", where)
    else:
        raise ValueError(f"{where}: output kind must be one of {list(OUTPUT_KINDS)}, got {_short(kind)}")


def check_specs(input_spec, output_spec, where: str) -> None:
    """ValueError (one line, prefixed with `where`) unless both specs are well-formed."""
    check_input_spec(input_spec, where)
    check_output_spec(output_spec, where)


def output_size(output_spec: dict) -> int:
    """How many values the network outputs per observation for this (checked) output spec."""
    kind = output_spec["kind"]
    if kind == "discrete":
        return int(output_spec["n"])
    if kind == "continuous":
        return math.prod(int(d) for d in output_spec["shape"])
    return int(output_spec["dim"])


def check_output_size(output_spec, n_outputs: int, where: str) -> None:
    """ValueError unless the network's output width matches the (checked) output spec."""
    check_output_spec(output_spec, where)
    expected = output_size(output_spec)
    if int(n_outputs) != expected:
        what = {"discrete": f"{expected} actions", "continuous": f"an action of {expected} values",
                "features": f"{expected} features"}[output_spec["kind"]]
        values = f"{int(n_outputs)} value" + ("" if int(n_outputs) == 1 else "s")
        raise ValueError(f"{where}: the output spec says {what} but the network outputs {values}; "
                         "give the right --env or config \"output\", or compile the matching network")
