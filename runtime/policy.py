"""`load("policy.bitrl")` -> Policy: observations in, environment-ready actions out (numpy only).

The manifest says how to prepare an observation (one-hot, /255, normalisation statistics
baked in at compile time) and how to turn the network's output into an action the
environment accepts (argmax or sampling for discrete actions; tanh squash and rescaling to
the Box bounds, or clipping, for continuous ones). No torch and no TVM compiler are imported.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import threading
import uuid
from collections.abc import Mapping

import numpy as np

from .artifact import LIB, PARAMS, RUNTIME, ArtifactError, load_params, read_artifact
from .plan import Plan, to_pixels
from .tvm_runtime import (
    LibraryLoadError,
    NativeLibrary,
    aligned,
    check_elf,
    cpu_flags,
    enable_amx,
    load_module,
    new_vm,
    to_device,
)


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def check_runnable_here(manifest: dict, path: str | os.PathLike = "artifact") -> None:
    """Raise ArtifactError (one line, with the fix) if this machine cannot run the artifact."""
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("cpu_features", []), list):
        raise ArtifactError(f"{path}: manifest target is not an object with arch and cpu_features; "
                            "recompile the artifact")
    arch = target.get("arch")
    if arch != host_arch():
        raise ArtifactError(
            f"{path}: compiled for {arch} (target {target.get('name')}) and this machine is {host_arch()}; "
            f"run it on the target device, or emulated here with `bitrl-compile run {path}` (qemu-{arch})")
    flags = cpu_flags()
    missing = [f for f in target.get("cpu_features", []) if f not in flags]
    if missing and flags:
        raise ArtifactError(f"{path}: target {target.get('name')} needs CPU features {missing} that this CPU "
                            "lacks; recompile with `--target host`")
    if "amx_tile" in target.get("cpu_features", []) and not enable_amx():
        raise ArtifactError(f"{path}: its kernels use AMX, and Linux did not grant this process the AMX state "
                            "(needs Linux >= 5.16); recompile with `--target x86-avx512`")


def normalization(input_spec: dict) -> tuple | None:
    """The observation statistics baked into an input spec, as prepare_observations takes them."""
    norm = input_spec.get("normalize")
    if not norm:
        return None
    return (np.asarray(norm["mean"], np.float32), np.asarray(norm["var"], np.float32),
            np.float32(norm.get("eps", 1e-8)), norm.get("clip"))


def normalize(x: np.ndarray, norm: tuple | None) -> np.ndarray:
    """clip((x - mean) / sqrt(var + eps)) in float32 with `norm` = normalization(input_spec); x when None."""
    if norm is None:
        return x
    mean, var, eps, clip = norm
    x = (x - mean) / np.sqrt(var + eps)
    return x if clip is None else np.clip(x, -clip, clip)


def _key_array(name: str, value, shape: tuple) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.float32 and not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"observation key {name!r} must be numeric, got dtype {arr.dtype}")
    if arr.shape != shape and arr.shape[1:] != shape:
        raise ValueError(f"observation key {name!r} has shape {arr.shape}; this policy expects {shape} or a batch "
                         f"(B, {', '.join(map(str, shape))})")
    return arr


def _key_index(name: str, value, n: int) -> np.ndarray:
    """A Discrete key's value: an integer (one observation) or a 1-D batch of integers in [0, n), validated as a
    whole-observation one-hot input is (`check_observations`); the C API checks the same of the row's float."""
    arr = np.asarray(value)
    if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"observation key {name!r} is a Discrete({n}) index: give an integer or a 1-D batch of "
                         f"integers in [0, {n}); got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = arr.min() if arr.min() < 0 else arr.max()
        raise ValueError(f"observation key {name!r} index out of range [0, {n}): got {bad}")
    return arr


def _rows(batch: int | None) -> str:
    return "one observation" if batch is None else f"a batch of {batch}"


def flatten_observations(input_spec: dict, obs):
    """A Dict observation (a mapping of key -> array, one observation or a batch) -> the flat float32 [total] or
    [B, total] the policy takes: each key's array flattened, concatenated in the manifest's key order (the layout
    of runtime/specs.py, which the C API documents; a Discrete key's integer index is its one value). Anything
    else is returned as it is (a flat array is still accepted). ValueError, one line naming the key, for a missing
    or extra key, a wrong shape, mixed batches, a Discrete key's value that is no index in [0, n)."""
    keys = input_spec.get("keys") if input_spec.get("kind") == "dict" else None
    if not isinstance(obs, Mapping):
        return obs
    if keys is None:
        raise ValueError(f"observation is a dict (keys {sorted(map(str, obs))[:8]}) but this policy takes one array "
                         f"of shape {tuple(input_spec['shape'])}")
    names = [k["name"] for k in keys]
    extra = [k for k in obs if k not in names]
    if extra:
        raise ValueError(f"observation has key {str(extra[0])!r}, which this policy does not take (its keys: "
                         f"{', '.join(names)})")
    parts, batch = [], None
    for key in keys:
        name, shape = key["name"], tuple(int(d) for d in key["shape"])
        if name not in obs:
            raise ValueError(f"observation lacks key {name!r} (shape {shape}); this policy takes keys "
                             f"{', '.join(names)}")
        if key.get("preprocess") == "onehot":  # its index: one value in the row
            arr = _key_index(name, obs[name], int(key["n"]))
            rows = None if arr.ndim == 0 else arr.shape[0]
        else:
            arr = _key_array(name, obs[name], shape)
            rows = None if arr.shape == shape else arr.shape[0]
        if parts and rows != batch:
            raise ValueError(f"observation key {name!r} is {_rows(rows)} but key {keys[0]['name']!r} is "
                             f"{_rows(batch)}; give every key the same batch")
        batch = rows
        parts.append(arr.reshape(-1 if rows is None else (rows, -1)).astype(np.float32, copy=False))
    return np.concatenate(parts, axis=-1)


def check_observations(input_spec: dict, obs) -> tuple[np.ndarray, bool]:
    """One observation or a batch -> (a [B, *shape] array ready to be copied into float32, whether it was one
    observation), validated: shape, dtype, one-hot index range. For one-hot inputs the array is the [B] indices.
    A Dict observation's keys are flattened first (`flatten_observations`). Finiteness is checked after the
    float32 conversion (`check_finite`)."""
    kind = input_spec.get("preprocess", "none")
    obs = np.asarray(flatten_observations(input_spec, obs))
    if kind == "onehot":
        n = int(input_spec["n"])
        if obs.ndim > 1 or not np.issubdtype(obs.dtype, np.integer):
            raise ValueError(f"observation must be an integer or a 1-D batch of integers in [0, {n}); "
                             f"got shape {obs.shape} dtype {obs.dtype}")
        single = obs.ndim == 0
        x = obs.reshape(-1)
        if x.size and (x.min() < 0 or x.max() >= n):
            raise ValueError(f"observation index out of range [0, {n})")
    else:
        obs_shape = tuple(input_spec["shape"])
        if obs.dtype != np.float32 and not (np.issubdtype(obs.dtype, np.number) or obs.dtype == np.bool_):
            raise ValueError(f"observation must be numeric, got dtype {obs.dtype}")
        if obs.shape == obs_shape:
            single, x = True, obs.reshape(1, *obs_shape)
        elif obs.shape[1:] == obs_shape:
            single, x = False, obs
        else:
            raise ValueError(f"observation has shape {obs.shape}; this policy expects {obs_shape} "
                             f"or a batch (B, {', '.join(map(str, obs_shape))})")
    if x.shape[0] == 0:
        raise ValueError("observation batch is empty (batch size 0)")
    if kind != "onehot" and index_keys(input_spec):
        _check_key_indices(input_spec, x)
    return x, single


def index_keys(input_spec: dict) -> list[tuple[str, int, int]]:
    """(name, offset in the flat row, n) of a Dict observation's Discrete keys (preprocess onehot)."""
    out, offset = [], 0
    for key in input_spec.get("keys") or [] if input_spec.get("kind") == "dict" else []:
        if key.get("preprocess") == "onehot":
            out.append((key["name"], offset, int(key["n"])))
        offset += math.prod(int(d) for d in key["shape"])
    return out


def _check_key_indices(input_spec: dict, x: np.ndarray) -> None:
    """ValueError (one line naming the key) unless each Discrete key's slot of every flat row is a whole number
    in [0, n): the module one-hot encodes it, and any other value would silently encode as no action's input (the
    C API checks the same)."""
    for name, offset, n in index_keys(input_spec):
        v = np.asarray(x[:, offset], np.float64)
        bad = ~(np.isfinite(v) & (v == np.floor(v)) & (v >= 0) & (v < n))
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"observation key {name!r} (flat row value {offset}) is {v[row]} in row {row}; it is a "
                             f"Discrete({n}) index: give a whole number in [0, {n})")


def initial_state(input_spec: dict, batch: int | None = None, path: str = "artifact") -> np.ndarray:
    """A recurrent policy's state before the first step: zeros, [state_size] for one observation or
    [batch, state_size] (the layout: the input spec's "recurrent", h of every LSTM layer, then c)."""
    recurrent = input_spec.get("recurrent")
    if not recurrent:
        raise ValueError(f"{path} is not a recurrent policy: it has no state; call act(obs)")
    size = int(recurrent["state_size"])
    return np.zeros(size if batch is None else (int(batch), size), np.float32)


_FLOAT32 = np.dtype(np.float32)
_OPEN_LOCK = threading.Lock()


def check_finite(x: np.ndarray) -> None:
    """ValueError unless every value of a float32 array is finite (cheap for one small observation too)."""
    ok = math.isfinite(sum(x.ravel().tolist())) if x.size <= 64 else bool(np.isfinite(x).all())
    if not ok:  # a float32 sum of <= 64 values cannot overflow a Python float: only NaN/Inf make it non-finite
        raise ValueError("observation contains NaN or Inf")


def prepare_observations(input_spec: dict, obs, norm: tuple | None = None) -> tuple[np.ndarray, bool]:
    """One observation or a batch -> (the network's float32 [B, *shape] input, whether it was one observation):
    validation (shape, dtype, range, NaN/Inf), one-hot, /255, text serialisation, then `norm` (what
    `normalization(input_spec)` returns) applied. The manifest's input spec says which. (What the compiled
    entry points do inside the module, done in numpy: the reference and artifacts without entry points use it.)"""
    kind = input_spec.get("preprocess", "none")
    x, single = check_observations(input_spec, obs)
    if kind == "onehot":
        x = np.eye(int(input_spec["n"]), dtype=np.float32)[x]
    else:
        x = x.astype(np.float32, copy=False)
        if kind == "image":
            x = x / np.float32(255.0)
    check_finite(x)
    if kind == "text":  # a text state encoder: the state written as text, one token per byte (runtime/text.py)
        from .text import serialize

        x = serialize(x, int(input_spec["text"]["decimals"])).astype(np.float32)
    return aligned(normalize(x, norm), np.float32), single


def postprocess(output_spec: dict, out: np.ndarray, deterministic: bool = True, rng=None, path: str = "artifact"):
    """The network's [B, ...] output -> actions the environment accepts, as the manifest's output spec says:
    argmax or sampling for Discrete; tanh squash and rescaling to the Box bounds, or clipping, for Box."""
    spec = output_spec
    if spec["kind"] == "features":
        raise ValueError(f"{path} is a backbone (output kind \"features\", {spec.get('dim')} values), not a "
                         "policy; call features(obs) and feed them to trained heads")
    if spec["kind"] == "discrete":
        if deterministic or spec.get("outputs") == "q_values":
            return np.argmax(out, axis=-1)
        rng = rng or np.random.default_rng()
        z = out - out.max(axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        u = rng.random((out.shape[0], 1))
        return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), out.shape[-1] - 1)
    mean = out.reshape((out.shape[0], *spec["shape"]))
    if not deterministic and spec.get("log_std") is not None:
        rng = rng or np.random.default_rng()
        std = np.exp(np.asarray(spec["log_std"], np.float32)).reshape(spec["shape"])
        mean = mean + std * rng.standard_normal(mean.shape).astype(np.float32)
    low = np.asarray(spec["low"], np.float32).reshape(spec["shape"])
    high = np.asarray(spec["high"], np.float32).reshape(spec["shape"])
    squash = spec.get("squash", "clip")
    if squash == "tanh":
        a = low + (np.tanh(mean) + 1.0) * 0.5 * (high - low)
    elif squash == "clip":
        a = np.clip(mean, low, high)
    else:
        a = mean
    return a.astype(np.float32)


class Policy:
    """A compiled policy. `act(obs)` takes one observation or a batch and returns action(s).

    One Policy may be called from many threads at once: the kernels of an entry point are called directly
    (runtime/plan.py) on buffers of the calling thread; where an artifact has no plan, each thread gets its
    own Relax VM. `close()` (or a `with` block) releases the library and the parameters."""

    def __init__(self, manifest: dict, lib_bytes: bytes, params: dict[str, np.ndarray], path="artifact",
                 bundled_runtime: bytes | None = None):
        self.manifest = manifest
        self.path = str(path)
        self.input_spec = manifest["input"]
        self.output_spec = manifest["output"]
        self.obs_shape = tuple(self.input_spec["shape"])
        self._lib_bytes, self._bundled_runtime = lib_bytes, bundled_runtime
        self._module = None  # the Relax VM's module, opened on first use (entry points without a plan)
        self._params_np = {name: aligned(value) for name, value in params.items()}
        self._params = {name: to_device(value) for name, value in self._params_np.items()}
        self._plans = {}
        if manifest.get("entry_points"):
            library = self._with_file(lambda path: NativeLibrary(path, bundled_runtime))
            for name, spec in manifest["entry_points"].items():
                try:
                    self._plans[name] = Plan(name, spec, library, self._params)
                except KeyError as e:  # the plan's structure is checked (runtime/manifest.py), not lib.so's symbols
                    raise ArtifactError(f"{self.path}: entry point {name} calls {str(e.args[0])[:80]}, which its "
                                        "lib.so does not export; recompile the artifact") from None
        self._entries = set(manifest.get("vm_params", {})) | set(self._plans)
        # act()'s fast path takes one observation of these dtypes as it is: float32, and an image policy's uint8
        # frames (integers cannot be NaN: no finiteness pass over a frame); only uint8 frames when the plan reads
        # them as they are (an input of uint8 pixels: other dtypes are checked on the way, plan.to_pixels)
        act = self._plans.get("act")
        pixels = act is not None and act.plan["inputs"][0]["dtype"] == "uint8"
        # every entry point of an image policy reads the frame alike (passes/entry_points.py folds each): one
        # without a plan (the Relax VM) takes uint8 pixels too
        self._pixels = any(plan.plan["inputs"][0]["dtype"] == "uint8" for plan in self._plans.values())
        self._fast_dtypes = () if act is None or self.input_spec.get("preprocess", "none") not in ("none", "image") \
            or index_keys(self.input_spec) \
            else (np.dtype(np.uint8),) if pixels \
            else tuple({_FLOAT32, np.dtype(act.plan["inputs"][0]["dtype"]),
                        *([np.dtype(np.uint8)] if self.input_spec.get("preprocess") == "image" else [])})
        self._vm_params = manifest.get("vm_params") or {"main": list(manifest["params"])}
        self._local = threading.local()
        self._norm = normalization(self.input_spec)  # for artifacts without entry points
        self._text = self.input_spec.get("preprocess") == "text"
        self._discrete = self.output_spec["kind"] == "discrete"
        self._batch_max = int((manifest.get("batch") or {}).get("max") or 1 << 62)
        recurrent = self.input_spec.get("recurrent")
        self.state_size = int(recurrent["state_size"]) if recurrent else 0  # 0: not a recurrent policy
        self._closed = False

    # ---------------------------------------------------------------- inference

    def _call(self, entry: str, *inputs: np.ndarray) -> np.ndarray:
        """Run entry point `entry` on [B, ...] inputs; its output, owned by the caller."""
        return self._call_all(entry, *inputs)[0]

    def _call_all(self, entry: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """Every output of entry point `entry` (a recurrent policy's: the result and the next state)."""
        plan = self._plans.get(entry)
        if plan is not None:
            return plan.run(*inputs, check=check_finite)  # checks the observations, not the state or noise
        return self._call_vm(entry, *inputs)

    def _call_vm(self, entry: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """`_call_all` through the Relax VM: artifacts without a plan."""
        if self._closed:
            raise ValueError(f"{self.path}: this Policy was closed; load the artifact again")
        vm = getattr(self._local, "vm", None)
        if vm is None:  # one VM per thread: a VM's registers are not safe to share
            with _OPEN_LOCK:
                if self._module is None:
                    self._module = self._with_file(lambda path: load_module(path, self._bundled_runtime))
            vm = self._local.vm = new_vm(self._module)
        arrays = [aligned(to_pixels(inputs[0])) if self._pixels else aligned(inputs[0], np.float32),
                  *(aligned(x, np.float32) for x in inputs[1:])]
        if entry != "sample":
            check_finite(arrays[0])
        result = vm[entry](*[to_device(a) for a in arrays], *[self._params[n] for n in self._vm_params[entry]])
        results = [result] if hasattr(result, "__dlpack__") else list(result)
        return [np.from_dlpack(r).copy() for r in results]

    def _with_file(self, open_library):
        """open_library(path) on lib.so written to a temporary file, removed once opened (it stays mapped).
        A library the dynamic loader refuses (another machine's, or garbage) is an ArtifactError."""
        # a name never used before: the dynamic loader hands back an already loaded library of the same name
        try:
            check_elf(LIB, self._lib_bytes)
        except LibraryLoadError as e:
            raise ArtifactError(f"{self.path}: {e.member} cannot be loaded ({e.reason}); recompile the artifact "
                                "for this machine") from None
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f"bitrl-{uuid.uuid4().hex}-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._lib_bytes)
            return open_library(tmp)
        except LibraryLoadError as e:
            raise ArtifactError(f"{self.path}: {e.member} cannot be loaded ({e.reason}); recompile the artifact "
                                "for this machine") from None
        finally:
            os.unlink(tmp)

    def _inputs(self, obs) -> tuple[np.ndarray, bool]:
        """Validated observations for the entry points (which normalise, one-hot and /255 themselves)."""
        if self._closed:
            raise ValueError(f"{self.path}: this Policy was closed; load the artifact again")
        if self._text:  # serialising the state as text is a host step
            x, single = prepare_observations(self.input_spec, obs)
        else:
            x, single = check_observations(self.input_spec, obs)
        if len(x) > self._batch_max:  # what the C API refuses too (the Relax VM's storage is sized for it)
            raise ValueError(f"a batch of {len(x)} observations is more than this artifact takes ({self._batch_max}, "
                             "manifest batch.max); split it")
        return x, single

    # ---------------------------------------------------------------- recurrent policies

    def initial_state(self, batch: int | None = None) -> np.ndarray:
        """A recurrent policy's state before the first step (`initial_state`)."""
        return initial_state(self.input_spec, batch, self.path)

    def _state(self, state, episode_start, n: int, single: bool) -> tuple[np.ndarray, np.ndarray]:
        """Validated ([n, state_size] state, [n] episode starts as 0/1) of a recurrent step; None is the initial
        state and no episode start."""
        size = self.state_size
        if not size:
            raise ValueError(f"{self.path} is not a recurrent policy: it takes no state (pass deterministic= and "
                             "rng= by keyword)")
        want = (size,) if single else (n, size)
        hint = f"policy.initial_state({'' if single else n})"
        if state is None:
            state = np.zeros((n, size), np.float32)
        else:
            state = np.asarray(state)
            if state.shape != want or not (np.issubdtype(state.dtype, np.floating)):
                raise ValueError(f"state has shape {state.shape} and dtype {state.dtype}; this step takes float "
                                 f"{want} (the state returned by the previous step, or {hint})")
            state = state.reshape(n, size).astype(np.float32, copy=False)
            if not np.isfinite(state).all():
                raise ValueError(f"state contains NaN or Inf; start again from {hint}")
        if episode_start is None:
            start = np.zeros(n, np.float32)
        else:
            start = np.asarray(episode_start)
            if start.size != n or start.ndim > 1:
                raise ValueError(f"episode_start has shape {start.shape}; this step takes {'one flag' if single else n} "
                                 "(1 where an episode begins: the state is reset there)")
            start = start.reshape(n).astype(np.float32) != 0
            start = start.astype(np.float32)
        return state, start

    # ---------------------------------------------------------------- inference

    def forward(self, obs, state=None, episode_start=None):
        """The network's raw output (logits, Q-values or action mean) for one obs or a batch; a recurrent policy's
        is (output, next state), given its state (None: the initial state) and where episodes start."""
        if self.state_size:
            x, single = self._inputs(obs)
            out, nxt = self._call_all("forward", x, *self._state(state, episode_start, len(x), single))
            return (out[0], nxt[0]) if single else (out, nxt)
        if state is not None or episode_start is not None:
            self._state(state, episode_start, 1, True)  # raises: not recurrent
        out, single = self._forward(obs)
        return out[0] if single else out

    def _forward(self, obs) -> tuple[np.ndarray, bool]:
        if "forward" in self._entries:
            x, single = self._inputs(obs)
            return self._call("forward", x), single
        if self._closed:
            raise ValueError(f"{self.path}: this Policy was closed; load the artifact again")
        # an artifact without entry points: numpy prepares, the VM runs main
        x, single = prepare_observations(self.input_spec, obs, self._norm)
        return self._call("main", x), single

    def features(self, obs) -> np.ndarray:
        """A backbone's output features, [D] for one observation or [B, D] for a batch (output kind "features")."""
        if self.output_spec["kind"] != "features":
            raise ValueError(f"{self.path} is a policy (output kind {self.output_spec['kind']!r}), not a backbone; "
                             "call act(obs) or forward(obs), or compile a torso with `bitrl-compile MODEL --features`")
        return self.forward(obs)

    def act(self, obs, state=None, episode_start=None, deterministic: bool = True,
            rng: np.random.Generator | None = None):
        """Action(s) the environment accepts: int for Discrete, float32 array inside the Box for Box.
        Stochastic actions (deterministic=False) draw their noise from `rng` (default: a fresh generator).
        A recurrent policy returns (action(s), next state): `state` is what the previous step returned (None, or
        `initial_state(batch)`, at the start) and `episode_start` is 1 where an episode begins (its state is
        reset first, as SB3's RecurrentPPO does)."""
        if self.state_size or state is not None or episode_start is not None:
            return self._act_recurrent(obs, state, episode_start, deterministic, rng)
        if "act" not in self._entries:  # a backbone (postprocess says so), or an artifact without entry points
            out, single = self._forward(obs)
            actions = self.postprocess(out, deterministic, rng)
            return actions[0] if single else actions
        plan = self._plans.get("act")
        if deterministic and type(obs) is np.ndarray and obs.dtype in self._fast_dtypes \
                and obs.shape == self.obs_shape:  # the common call, one observation: the fewest steps
            frame = plan.frame(1)
            frame.single[...] = obs
            if obs.dtype is _FLOAT32:
                check_finite(frame.flat)
            for function, args in frame.calls:
                function(*args)
            action = frame.outputs[0][0][0]
            return action if self._discrete else action.copy()
        x, single = self._inputs(obs)
        if deterministic or "sample" not in self._entries:
            actions = self._call("act", x)
        else:
            actions = self._call("sample", x, self._noise(len(x), rng))
        return actions[0] if single else actions

    def _noise(self, n: int, rng) -> np.ndarray:
        rng = rng or np.random.default_rng()
        spec = self.output_spec
        return rng.random((n, 1)) if spec["kind"] == "discrete" else rng.standard_normal((n, *spec["shape"]))

    def _act_recurrent(self, obs, state, episode_start, deterministic: bool, rng):
        x, single = self._inputs(obs)
        inputs = (x, *self._state(state, episode_start, len(x), single))
        if deterministic or "sample" not in self._entries:
            actions, nxt = self._call_all("act", *inputs)
        else:
            actions, nxt = self._call_all("sample", *inputs, self._noise(len(x), rng))
        return (actions[0], nxt[0]) if single else (actions, nxt)

    def postprocess(self, out: np.ndarray, deterministic: bool = True, rng=None):
        return postprocess(self.output_spec, out, deterministic, rng, self.path)

    def close(self) -> None:
        """Release the compiled library and the parameters (the PolicyLike interface); calls after this raise.
        Calls already running in other threads finish first: they hold what they use."""
        self._closed = True
        self._plans = {}  # the last reference to the library's functions: NativeLibrary dlcloses it
        self._module = self._lib_bytes = None
        self._local = threading.local()
        self._params = self._params_np = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        t = self.manifest.get("target", {})
        return f"Policy({self.path!r}, target={t.get('name')}, obs_shape={self.obs_shape})"


def load(path: str | os.PathLike, trusted_keys=None) -> Policy:
    """Load and verify a policy.bitrl artifact for this machine.

    Every check runs before any native code is loaded: limits, the sha256 of the manifest and of every member,
    the signature when trusted keys are configured (`trusted_keys`: public key PEM paths, PEM bytes or raw 32-byte
    Ed25519 keys, joined by the paths in BITRL_TRUSTED_KEYS), the manifest's structure and specs
    (runtime/manifest.py), the machine (architecture, CPU features), the parameters. Loading then runs lib.so's code: see docs/security.md."""
    art = read_artifact(path, trusted_keys, params=False)  # the parameters stay in the file until:
    check_runnable_here(art.manifest, path)
    params = load_params(art)  # streamed into their compute layout, checked against the manifest's sha256
    missing = [n for n in art.manifest["params"] if n not in params]
    if missing:
        raise ArtifactError(f"{path}: parameters {missing} are missing from {PARAMS}; recompile the artifact")
    return Policy(art.manifest, art.members[LIB], params, path, art.members.get(RUNTIME))
