"""`load("policy.bitrl")` -> Policy: observations in, environment-ready actions out (numpy only).

The manifest says how to prepare an observation (one-hot, /255, normalisation statistics
baked in at compile time) and how to turn the network's output into an action the
environment accepts (argmax or sampling for discrete actions; tanh squash and rescaling to
the Box bounds, or clipping, for continuous ones). No torch and no TVM compiler are imported.
"""

from __future__ import annotations

import os
import platform
import tempfile

import numpy as np

from . import safetensors_np, weights
from .artifact import LIB, PARAMS, RUNTIME, ArtifactError, read_artifact
from .tvm_runtime import aligned, cpu_flags, enable_amx, load_vm, to_device


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def check_runnable_here(manifest: dict, path: str | os.PathLike = "artifact") -> None:
    """Raise ArtifactError (one line, with the fix) if this machine cannot run the artifact."""
    target = manifest.get("target", {})
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


def prepare_observations(input_spec: dict, obs, norm: tuple | None = None) -> tuple[np.ndarray, bool]:
    """One observation or a batch -> (the network's float32 [B, *shape] input, whether it was one observation):
    validation (shape, dtype, range, NaN/Inf), one-hot, /255, text serialisation, then `norm` (what
    `normalization(input_spec)` returns) applied. The manifest's input spec says which."""
    kind = input_spec.get("preprocess", "none")
    obs_shape = tuple(input_spec["shape"])
    obs = np.asarray(obs)
    if kind == "onehot":
        n = int(input_spec["n"])
        if obs.ndim > 1 or not np.issubdtype(obs.dtype, np.integer):
            raise ValueError(f"observation must be an integer or a 1-D batch of integers in [0, {n}); "
                             f"got shape {obs.shape} dtype {obs.dtype}")
        single = obs.ndim == 0
        idx = obs.reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"observation index out of range [0, {n})")
        x = np.eye(n, dtype=np.float32)[idx]
    else:
        if obs.dtype != np.float32 and not (np.issubdtype(obs.dtype, np.number) or obs.dtype == np.bool_):
            raise ValueError(f"observation must be numeric, got dtype {obs.dtype}")
        if obs.shape == obs_shape:
            single, x = True, obs.reshape(1, *obs_shape)
        elif obs.shape[1:] == obs_shape:
            single, x = False, obs
        else:
            raise ValueError(f"observation has shape {obs.shape}; this policy expects {obs_shape} "
                             f"or a batch (B, {', '.join(map(str, obs_shape))})")
        x = x.astype(np.float32, copy=False)
        if kind == "image":
            x = x / np.float32(255.0)
    if x.shape[0] == 0:
        raise ValueError("observation batch is empty (batch size 0)")
    if not np.all(np.isfinite(x)):
        raise ValueError("observation contains NaN or Inf")
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
    """A compiled policy. `act(obs)` takes one observation or a batch and returns action(s)."""

    def __init__(self, manifest: dict, lib_bytes: bytes, params: dict[str, np.ndarray], path="artifact",
                 bundled_runtime: bytes | None = None):
        self.manifest = manifest
        self.path = str(path)
        self.input_spec = manifest["input"]
        self.output_spec = manifest["output"]
        self.obs_shape = tuple(self.input_spec["shape"])
        # tvm-ffi opens the library from a file; it stays mapped after the file is removed.
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix="bitrl-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(lib_bytes)
            self._vm = load_vm(tmp, bundled_runtime)
        finally:
            os.unlink(tmp)
        self._main = self._vm["main"]
        self._params_np = [aligned(params[name]) for name in manifest["params"]]
        self._params = [to_device(p) for p in self._params_np]
        self._norm = normalization(self.input_spec)

    def _prepare(self, obs) -> tuple[np.ndarray, bool]:
        return prepare_observations(self.input_spec, obs, self._norm)

    # ---------------------------------------------------------------- inference

    def forward(self, obs) -> np.ndarray:
        """The network's raw output (logits, Q-values or action mean) for one obs or a batch."""
        x, single = self._prepare(obs)
        out = self._run(x)
        return out[0] if single else out

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._main is None:
            raise ValueError(f"{self.path}: this Policy was closed; load the artifact again")
        result = self._main(to_device(x), *self._params)
        if not hasattr(result, "__dlpack__") and len(result) == 1:
            result = result[0]
        return np.from_dlpack(result).copy()

    def features(self, obs) -> np.ndarray:
        """A backbone's output features, [D] for one observation or [B, D] for a batch (output kind "features")."""
        if self.output_spec["kind"] != "features":
            raise ValueError(f"{self.path} is a policy (output kind {self.output_spec['kind']!r}), not a backbone; "
                             "call act(obs) or forward(obs), or compile a torso with `bitrl-compile MODEL --features`")
        return self.forward(obs)

    def act(self, obs, deterministic: bool = True, rng: np.random.Generator | None = None):
        """Action(s) the environment accepts: int for Discrete, float32 array inside the Box for Box."""
        x, single = self._prepare(obs)
        out = self._run(x)
        actions = self.postprocess(out, deterministic, rng)
        return actions[0] if single else actions

    def postprocess(self, out: np.ndarray, deterministic: bool = True, rng=None):
        return postprocess(self.output_spec, out, deterministic, rng, self.path)

    def close(self) -> None:
        """Drop the compiled module and the parameters (the PolicyLike interface); calls after this raise."""
        self._vm = self._main = None
        self._params = self._params_np = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        t = self.manifest.get("target", {})
        return f"Policy({self.path!r}, target={t.get('name')}, obs_shape={self.obs_shape})"


def load(path: str | os.PathLike) -> Policy:
    """Load and verify a policy.bitrl artifact for this machine."""
    art = read_artifact(path)
    check_runnable_here(art.manifest, path)
    try:
        params, _ = safetensors_np.loads(art.members[PARAMS])
    except ValueError as e:
        raise ArtifactError(f"{path}: {PARAMS} is unreadable ({e}); recompile the artifact") from None
    missing = [n for n in art.manifest["params"] if n not in params]
    if missing:
        raise ArtifactError(f"{path}: parameters {missing} are missing from {PARAMS}; recompile the artifact")
    try:
        params = weights.unpack_params(params, art.manifest.get("weights", {}))
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: {e}; recompile the artifact") from None
    return Policy(art.manifest, art.members[LIB], params, path, art.members.get(RUNTIME))
