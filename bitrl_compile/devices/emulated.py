"""An aarch64 (Raspberry Pi) policy.bitrl run on this x86 machine: the runtime in the aarch64 Python under qemu.

    with EmulatedPolicy("policy.bitrl") as policy:      # rasp4 artifact, qemu -cpu cortex-a72
        action = policy.act(obs)

The guest runs `python -m bitrl_compile.runtime.serve ARTIFACT` (devices/sysroot.py builds the
aarch64 Python it runs in) and answers one message per call on its stdin/stdout. An EmulatedPolicy
is a `runtime.PolicyLike`, as a native `runtime.Policy` is; it starts in about 3 s and then answers
a call in about 1 ms; its timings are not the device's. `open_policy(path)` picks the one that fits
the artifact's architecture.

Trusted keys (an argument, or BITRL_TRUSTED_KEYS) are checked here, on the host: the guest's Python has no
`cryptography`. The artifact is copied, the copy verified (signature and every member's sha256), and the guest
started on that copy without BITRL_TRUSTED_KEYS, so the bytes it runs are the bytes verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from bitrl_compile import runtime
from bitrl_compile.devices.sysroot import (
    DEFAULT_CPU,
    QEMU,
    EmulatorError,
    describe_exit,
    last_line,
    qemu_python_command,
)
from bitrl_compile.runtime import serve, signing
from bitrl_compile.runtime.artifact import ArtifactError
from bitrl_compile.runtime.policy import flatten_observations, host_arch, initial_state

_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "ArtifactError": ArtifactError,
                                       "TypeError": TypeError, "KeyError": KeyError,
                                       "IndexError": IndexError, "RuntimeError": RuntimeError}


def _raise_remote(header: dict) -> None:
    kind, message = header.get("error", "RuntimeError"), header.get("message", "")
    if kind in _ERRORS:
        raise _ERRORS[kind](message)
    raise EmulatorError(f"{kind}: {message}")


class EmulatedPolicy:
    """A policy.bitrl for aarch64 running in one persistent qemu process; a `runtime.PolicyLike`
    (manifest, forward, act, features, close), as runtime.Policy is.

    `act(obs, deterministic=False, rng=rng)` draws one seed from `rng` for the guest's sampler, so
    sampled actions are repeatable for a seeded rng but differ from a native Policy's.
    """

    def __init__(self, path: str | os.PathLike, cpu: str = DEFAULT_CPU, startup_timeout: float = 300.0,
                 trusted_keys=None):
        """trusted_keys: public keys (PEM paths, PEM bytes or raw Ed25519 keys), joined by BITRL_TRUSTED_KEYS;
        when there are any, the artifact must carry a signature by one of them (verified on this host)."""
        self.path = str(path)
        self.cpu = cpu
        self._lock = threading.Lock()
        self._proc = None
        try:
            keys = signing.trusted_keys(trusted_keys)
        except signing.SigningError as e:
            raise ArtifactError(f"{self.path}: {e}") from None
        folder = tempfile.mkdtemp(prefix="bitrl-verified-") if keys else None
        try:
            served, env = os.path.abspath(path), None
            if folder is not None:
                served = os.path.join(folder, "policy.bitrl")
                try:
                    shutil.copyfile(path, served)
                except OSError as e:
                    raise ArtifactError(f"{self.path}: cannot be read ({e.strerror}); check the path") from None
                runtime.read_artifact(served, keys, use_env=False)  # ArtifactError names the copy: say the path
                env = {k: v for k, v in os.environ.items() if k != signing.ENV}
            header = self._start(served, env, startup_timeout)
        except ArtifactError as e:
            raise ArtifactError(str(e).replace(served, self.path)) from None
        finally:
            if folder is not None:  # the guest has read the copy once it answered (or failed)
                with contextlib.suppress(OSError):
                    shutil.rmtree(folder)
        self.manifest: dict = header["manifest"]
        self.input_spec = self.manifest["input"]
        self.output_spec = self.manifest["output"]
        self.obs_shape = tuple(self.input_spec["shape"])

    def _start(self, served: str, env: dict | None, startup_timeout: float) -> dict:
        """Start the guest serving `served` (environment `env`, or this one's); its first message, the manifest."""
        command = qemu_python_command(self.cpu) + ["-m", "bitrl_compile.runtime.serve", served]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=env)
        try:
            ready, _, _ = select.select([self._proc.stdout], [], [], startup_timeout)
            if not ready:
                raise EmulatorError(f"{self.path}: the emulated runtime did not start within "
                                    f"{startup_timeout:.0f} s on {self.cpu}")
            header, _ = self._receive()
            if not header.get("ok"):
                _raise_remote(header)
        except BaseException:
            self.close()
            raise
        return header

    def forward(self, obs, state=None, episode_start=None):
        """The network's raw output (logits, Q-values or action mean) for one obs or a batch; a recurrent
        policy's (output, next state), as runtime.Policy.forward."""
        return self._call({"method": "forward"}, obs, state, episode_start)

    def features(self, obs) -> np.ndarray:
        """A backbone artifact's features (manifest output kind "features") for one obs or a batch."""
        return self._call({"method": "features"}, obs)

    def act(self, obs, state=None, episode_start=None, deterministic: bool = True,
            rng: np.random.Generator | None = None):
        """Action(s) the environment accepts: int for Discrete, float32 array inside the Box for Box; a recurrent
        policy's (actions, next state), as runtime.Policy.act."""
        seed = None
        if not deterministic:
            seed = int((rng or np.random.default_rng()).integers(2**63))
        return self._call({"method": "act", "deterministic": bool(deterministic), "seed": seed}, obs, state,
                          episode_start)

    def initial_state(self, batch: int | None = None) -> np.ndarray:
        """A recurrent policy's state before its first step (runtime.policy.initial_state)."""
        return initial_state(self.input_spec, batch, self.path)

    def _call(self, request: dict, obs, state=None, episode_start=None):
        obs = np.asarray(flatten_observations(self.input_spec, obs))  # a Dict observation travels flat
        if obs.dtype == object:  # has no bytes to send; the runtime's own message
            raise ValueError(f"observation must be numeric, got dtype {obs.dtype}")
        extra = ()
        if self.input_spec.get("recurrent") or state is not None or episode_start is not None:
            single = obs.shape == self.obs_shape
            n = 1 if single else len(obs)
            extra = (self.initial_state(None if single else n) if state is None else np.asarray(state),
                     np.zeros(() if single else n, np.float32) if episode_start is None
                     else np.asarray(episode_start, np.float32))
        header, payload = serve.array_message(obs, *extra)
        with self._lock:
            if self._proc is None:
                raise EmulatorError(f"{self.path}: the emulated policy is closed")
            try:
                serve.write_message(self._proc.stdin, dict(request, **header), payload)
            except (BrokenPipeError, OSError):
                raise self._died() from None
            reply, data = self._receive()
        if not reply.get("ok"):
            _raise_remote(reply)
        result, *state = serve.message_arrays(reply, data)
        result = result[()] if result.ndim == 0 else result
        return (result, state[0]) if state else result

    def _receive(self) -> tuple[dict, bytes]:
        try:
            message = serve.read_message(self._proc.stdout)
        except serve.ProtocolError:
            message = None
        if message is None:
            raise self._died()
        return message

    def _died(self) -> EmulatorError:
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        return EmulatorError(f"{self.path}: the emulated runtime ({QEMU} -cpu {self.cpu}) "
                             f"{describe_exit(code, self.cpu)}: {last_line(stderr)}")

    def close(self) -> None:
        """End the guest process (the PolicyLike interface); idempotent, calls after this raise."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # end of input: the server returns
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self.close()

    def __repr__(self) -> str:
        target = getattr(self, "manifest", {}).get("target", {})
        return f"EmulatedPolicy({self.path!r}, target={target.get('name')}, cpu={self.cpu})"


def qemu_cpu(manifest: dict) -> str:
    """The `qemu-aarch64 -cpu` that models the CPU an artifact was compiled for (its TVM target's mcpu)."""
    try:
        return json.loads(manifest["target"]["tvm"]).get("mcpu") or DEFAULT_CPU
    except (KeyError, TypeError, ValueError):
        return DEFAULT_CPU


def open_policy(path: str | os.PathLike, trusted_keys=None) -> runtime.PolicyLike:
    """A runtime Policy for this machine, or an EmulatedPolicy (qemu) for an artifact of another architecture.
    trusted_keys (joined by BITRL_TRUSTED_KEYS): the artifact must be signed by one of them, checked on this host
    for both kinds."""
    manifest = runtime.read_artifact(path, payload=False, use_env=False, signatures=False).manifest
    if manifest["target"]["arch"] != host_arch():
        return EmulatedPolicy(path, cpu=qemu_cpu(manifest), trusted_keys=trusted_keys)
    return runtime.load(path, trusted_keys)
