"""TVM's RPC server, what a Raspberry Pi runs for MetaSchedule autotuning, in the aarch64 Python under qemu.

On the device it is `python3 -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090`, reached from the workstation
through `ssh -N -L 9090:127.0.0.1:9090 pi@BOARD` (`--rpc 127.0.0.1:9090`): the server runs whatever code a client
uploads, without authentication, so it must not listen on a network (docs/security.md). Here it runs the same way,
bound to 127.0.0.1 by default, in the aarch64 Python of devices/sysroot.py with the guest TVM (`ensure_guest_tvm()`):

    with RPCServer("cortex-a72") as server:             # about 6 s to start
        remote = tvm.rpc.connect(server.host, server.port)

A farm of boards registers its servers with TVM's RPC tracker under a key; so can emulated ones (the tracker then
hands their address to whoever asks for a server of that key, e.g. `bitrl-compile tune --tracker H:P --key rasp4`):

    with RPCServer("cortex-a72", tracker="127.0.0.1:9190", key="rasp4") as server:   # ready once registered
        ...

`bitrl-compile emulator rpc-server [--cpu CPU] [--port PORT] [--tracker H:P --key KEY]` runs one in the foreground.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from bitrl_compile.devices.sysroot import (
    DEFAULT_CPU,
    PYTHON_VERSION,
    QEMU,
    Aarch64Python,
    EmulatorError,
    cpu_root,
    describe_exit,
    ensure_aarch64_python,
    ensure_guest_tvm,
    guest_command,
    last_line,
)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tracker_servers(host: str, port: int, timeout: float = 10.0) -> list[dict]:
    """The servers registered with TVM's RPC tracker at host:port ({"key": "server:KEY", "addr": [h, p]});
    OSError or RuntimeError if it does not answer as a tracker within `timeout` s."""
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise RuntimeError(f"{host}:{port} answered, but not as an RPC tracker")
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        code, summary = base.recvjson(sock)
        if code != base.TrackerCode.SUCCESS:
            raise RuntimeError(f"the tracker at {host}:{port} answered {code} to SUMMARY")
        return list(summary.get("server_info", []))


def _write_launcher(folder: Path, command: list[str], py: Aarch64Python) -> Path:
    """`folder/bin/python3.11`: a shell script that runs `command` (qemu and the guest Python) with "$@".

    qemu tells the guest that argv[0] is the script (`-0`), so the guest Python's sys.executable is
    the script, and a guest that starts Python again (TVM's RPC server runs its worker as
    `sys.executable -m tvm.exec.popen_worker`, multiprocessing's spawn does the same) gets qemu with
    the same -cpu, root and environment: without binfmt_misc the kernel cannot run an aarch64 binary
    itself (ENOEXEC). `folder/pyvenv.cfg` points that Python at the sysroot's standard library, as a
    venv's does (without it the guest would look for it in /usr and add /usr/local/... to sys.path).
    """
    launcher = folder / "bin" / f"python{PYTHON_VERSION}"
    launcher.parent.mkdir(parents=True)
    qemu, python = shlex.join(command[:-1]), shlex.quote(command[-1])
    launcher.write_text(f'#!/bin/sh\nexec {qemu} -0 "$0" {python} "$@"\n')
    launcher.chmod(0o755)
    (folder / "pyvenv.cfg").write_text(f"home = {py.python.parent}\n")
    return launcher


class RPCServer:
    """TVM's own RPC server, `python3.11 -m tvm.exec.rpc_server`, in the aarch64 Python under qemu.

    What a Raspberry Pi runs for MetaSchedule autotuning, on this machine:

        with RPCServer("cortex-a72") as server:         # starts in about 6 s
            remote = tvm.rpc.connect(server.host, server.port)
            remote.upload("lib.so")
            f = remote.load_module("lib.so")["main"]

    `port=None` picks a free one. With `tracker` ("HOST:PORT" of TVM's RPC tracker) and `key`, the server
    registers with the tracker under the key and is ready once the tracker lists it; clients then reach it
    through the tracker (`tvm.rpc.connect_tracker(...).request(key)`), not directly. The server forks a child per session, as on the device (fork works
    under qemu-user). `runtime_only` (TVM_USE_RUNTIME_LIB=1) loads libtvm_runtime.so, not the 229 MB
    libtvm_compiler.so, which a server does not call: a start takes about 6 s instead of 19 s (two
    Python processes import tvm). Its timings are qemu's, not the device's. Its files (log, uploads,
    the guest's TMPDIR) live in a temporary folder that `close()` removes, with the whole process group.
    """

    def __init__(self, cpu: str = DEFAULT_CPU, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 300.0, *, runtime_only: bool = True, tracker: str | None = None,
                 key: str | None = None):
        self.cpu = cpu
        self._host = host
        self._proc: subprocess.Popen | None = None
        self._folder: Path | None = None
        self.tracker, self.key = tracker, key
        if tracker is not None:
            self._tracker_addr = self._check_tracker(tracker, key)
        py = ensure_aarch64_python()
        site = ensure_guest_tvm()
        guest_root = cpu_root(py, cpu)  # an unknown CPU model fails here, with qemu's list to look at
        self._port = _free_port(host) if port is None else int(port)
        self._folder = Path(tempfile.mkdtemp(prefix="bitrl-rpc-"))
        try:
            (self._folder / "tmp").mkdir()
            env = {"TMPDIR": str(self._folder / "tmp"), "PYTHONUNBUFFERED": "1"}
            if runtime_only:
                env["TVM_USE_RUNTIME_LIB"] = "1"
            command = guest_command(py.root, guest_root, [site, py.site], cpu, env=env)
            launcher = _write_launcher(self._folder / "python", command, py)
            self.log_path = self._folder / "server.log"
            argv = [str(launcher), "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(self._port),
                    "--port-end", str(self._port + 1)]  # [port, port-end): this port or none
            if tracker is not None:  # the address the tracker hands out is the one the server listens on
                argv += ["--tracker", tracker, "--key", key, "--custom-addr", self._probe_host()]
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=self._folder,
                                              start_new_session=True)
            self._wait_until_ready(startup_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def _what(self) -> str:
        return f"TVM's RPC server ({QEMU} -cpu {self.cpu}, {self.address})"

    def _probe_host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self._host, self._host)

    @staticmethod
    def _check_tracker(tracker: str, key: str | None) -> tuple[str, int]:
        """(host, port) of a tracker that answers; EmulatorError with the fix otherwise (TVM's server would
        retry a refused tracker for 60 s and then exit)."""
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise EmulatorError(f"--tracker expects HOST:PORT (e.g. 127.0.0.1:9190), got {tracker!r}")
        if not key or not all(c.isalnum() or c in "_.+-" for c in key):
            raise EmulatorError(f"a server registered with a tracker needs a key of letters, digits and _.+- "
                                f"(e.g. --key rasp4), got {key!r}")
        try:
            _tracker_servers(host.strip("[]"), int(port))
        except Exception as e:  # refused, timed out, unknown host, not a tracker
            raise EmulatorError(f"cannot reach the RPC tracker at {tracker}: {last_line(str(e)) or type(e).__name__}; "
                                f"start one with `bitrl-compile tracker --port {port}`") from e
        return host.strip("[]"), int(port)

    def registered(self) -> bool:
        """Whether the tracker lists this server under its key (always False without a tracker)."""
        if self.tracker is None:
            return False
        servers = _tracker_servers(*self._tracker_addr)
        return any(item.get("key") == f"server:{self.key}" and int(item.get("addr", [0, 0])[1]) == self._port
                   for item in servers)

    def log_text(self) -> str:
        """What the server has written so far (its log lines: sessions, loaded modules)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_until_ready(self, timeout: float) -> None:
        """Until the log says "bind to HOST:PORT" and an RPC session opens (with a tracker: the tracker lists
        the server; a direct session would not match its key); EmulatorError if it dies."""
        import tvm.rpc

        probe_host = self._probe_host()
        deadline = time.monotonic() + timeout
        bound, last_error = False, ""
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmulatorError(f"{self._what()} {describe_exit(code, self.cpu)}: "
                                    f"{last_line(self.log_text())}")
            bound = bound or f"bind to {self._host}:{self._port}" in self.log_text()
            if bound and self.tracker is not None:
                try:
                    if self.registered():
                        return
                    last_error = f"not yet registered with the tracker at {self.tracker}"
                except Exception as e:  # noqa: BLE001 - the tracker went away: retry until the deadline
                    last_error = last_line(str(e)) or type(e).__name__
            elif bound:
                try:
                    session = tvm.rpc.connect(probe_host, self._port, session_timeout=60)
                except Exception as e:  # noqa: BLE001 - TVMError or socket error: retry until the deadline
                    last_error = last_line(str(e))
                else:
                    del session  # ends the session; the server goes back to accepting
                    return
            if time.monotonic() > deadline:
                log = self.log_text()
                why = last_error or (last_line(log) if log.strip() else "nothing in its log yet")
                raise EmulatorError(f"{self._what()} did not answer within {timeout:.0f} s: {why}")
            time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> int | None:
        """The server's exit status once it has ended (None if still running after `timeout` s)."""
        if self._proc is None:
            raise EmulatorError(f"{self._what()} is closed")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill the server's process group (its sessions and worker too) and remove its folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None or getattr(self, "_folder", None) is not None:
            self.close()

    def __repr__(self) -> str:
        state = "running" if getattr(self, "_proc", None) is not None else "closed"
        where = f", key {self.key} at tracker {self.tracker}" if getattr(self, "tracker", None) else ""
        return f"RPCServer({self._host}:{getattr(self, '_port', None)}, cpu={self.cpu}{where}, {state})"

