"""Where `bitrl-compile tune` measures a board's kernels: one TVM RPC server (`--rpc HOST:PORT`), or a farm of
boards behind TVM's RPC tracker (`--tracker HOST:PORT --key KEY`).

The tracker (`python3 -m tvm.exec.rpc_tracker`, or `bitrl-compile tracker`, which binds 127.0.0.1 by default) is
TVM's engine for a farm: each board's RPC server registers under a key (`rpc_server --tracker H:P --key rasp4`),
and a client asks the tracker for a free server of that key. MetaSchedule's RPCRunner uses it natively: one
runner worker per registered server, each candidate measured on whichever server is free, so a round of
candidates is measured on the whole farm in parallel. Like the RPC server, the tracker has no authentication
(whoever reaches it can take a board, or register a fake one that returns made-up timings): keep both on
loopback and reach them through SSH (docs/security.md).

    remote = Remote.of(rpc=None, tracker="127.0.0.1:9190", key=None, target="rasp4")   # key: the target's name
    remote.servers()                     # 2: registered under the key (an error names the command to add one)
    session = remote.connect(session_timeout=600)      # a free server's session, or an error after `wait` s
"""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass

from bitrl_compile.targets.tuning import TuneError

RPC_HELP = ("on the board run `python3 -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090` (after "
            "`pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 cloudpickle psutil` there; "
            "localhost only: the server runs any code it is sent, without authentication), here "
            "`ssh -N -L 9090:127.0.0.1:9090 pi@BOARD`, then pass --rpc 127.0.0.1:9090 (or a farm: --tracker, "
            "docs/tuning.md; docs/security.md)")
FREE_SERVER_WAIT = 120.0    # seconds to wait for a free server of the key before giving up
_KEY = re.compile(r"[A-Za-z0-9_.+-]+")


def _last_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


def parse_address(address: str, option: str = "--rpc",
                  example: str = "127.0.0.1:9090 through an SSH tunnel") -> tuple[str, int]:
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TuneError(f"{option} expects HOST:PORT (e.g. {example}), got {address!r}")
    return host.strip("[]"), int(port)


def connect_direct(rpc_config):
    """MetaSchedule runner session for --rpc: straight to the board's RPC server (no tracker)."""
    from tvm import rpc

    return rpc.connect(rpc_config.tracker_host, int(rpc_config.tracker_port),
                       session_timeout=rpc_config.session_timeout_sec)


def register_help(tracker: str, key: str) -> str:
    """The commands that register a board under `key` with the tracker at `tracker`."""
    return (f"register a board with `python3 -m tvm.exec.rpc_server --host 127.0.0.1 --port 9091 --port-end 9092 "
            f"--tracker {tracker} --key {key} --custom-addr 127.0.0.1` on it (through one SSH connection per "
            f"board, docs/tuning.md), or an emulated one here with `bitrl-compile emulator rpc-server --tracker "
            f"{tracker} --key {key}`")


def start_help(port: int | str = 9190) -> str:
    return (f"start one with `bitrl-compile tracker --port {port}` (or `python3 -m tvm.exec.rpc_tracker --host "
            f"127.0.0.1 --port {port}`; loopback only: it has no authentication, docs/security.md)")


def _tracker_session(host: str, port: int, timeout: float):
    """TVM's tracker client (`tvm.rpc.TrackerSession`) whose socket gives up after `timeout` s: TVM's own
    retries a refused connection for 60 s and waits for a free server forever."""
    from tvm.rpc import base
    from tvm.rpc.client import TrackerSession

    class _Session(TrackerSession):
        def _connect(self):
            self._sock = socket.create_connection(self._addr, timeout=timeout)
            self._sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(self._sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise RuntimeError(f"{self._addr} answered, but not as an RPC tracker")

        def request_within(self, key: str, wait: float, session_timeout: float):
            """A session with a free server of `key`; TimeoutError when none is free within `wait` s."""
            self._sock.settimeout(wait)
            started = time.monotonic()
            try:
                return self.request(key, session_timeout=session_timeout, max_retry=1)
            except RuntimeError as e:
                if time.monotonic() - started >= 0.95 * wait:
                    raise TimeoutError(str(e)) from e
                raise

    return _Session((host, port))


def tracker_summary(address: str, timeout: float = 10.0) -> dict:
    """The tracker's summary ({"queue_info": {key: {"free", "pending"}}, "server_info": [{"key": "server:K",
    "addr": [host, port]}]}); TuneError naming the command that starts a tracker if it does not answer."""
    host, port = parse_address(address, "--tracker", "127.0.0.1:9190")
    try:
        session = _tracker_session(host, port, timeout)
        try:
            return session.summary()
        finally:
            session.close()
    except Exception as e:  # refused, timed out, unknown host, not a tracker: one line
        raise TuneError(f"cannot reach the RPC tracker at {address}: {_last_line(e)}; {start_help(port)}") from e


def servers_under(summary: dict, key: str) -> list[str]:
    """HOST:PORT of every server registered under `key` (busy or free) in a tracker summary."""
    return [":".join(map(str, item.get("addr", ("?", "?")))) for item in summary.get("server_info", [])
            if str(item.get("key", "")).partition(":")[2] == key]


@dataclass(frozen=True)
class Remote:
    """A board (`rpc`: HOST:PORT of its RPC server) or a farm (`tracker`: HOST:PORT, `key`)."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None

    @classmethod
    def of(cls, rpc: str | None, tracker: str | None, key: str | None, target: str) -> Remote | None:
        """The remote the options name (None: measure here); TuneError for a bad combination or address."""
        if rpc is not None and tracker is not None:
            raise TuneError("--rpc and --tracker are exclusive: --rpc for one board, --tracker (with --key) for a "
                            "farm of boards registered with a tracker")
        if key is not None and tracker is None:
            raise TuneError(f"--key {key} names boards registered with a tracker: pass --tracker HOST:PORT too")
        if rpc is not None:
            parse_address(rpc)
            return cls(rpc=rpc)
        if tracker is None:
            return None
        parse_address(tracker, "--tracker", "127.0.0.1:9190")
        key = target if key is None else key
        if not _KEY.fullmatch(key):
            raise TuneError(f"--key {key!r}: a tracker key is letters, digits and _.+- (e.g. rasp4)")
        return cls(tracker=tracker, key=key)

    def __str__(self) -> str:
        return self.rpc if self.rpc is not None else f"key {self.key} at tracker {self.tracker}"

    def servers(self) -> int:
        """How many servers measure in parallel: 1 for --rpc; for a tracker, the servers registered under the
        key (TuneError naming the command that registers one when there are none)."""
        if self.rpc is not None:
            return 1
        found = servers_under(tracker_summary(self.tracker), self.key)
        if not found:
            raise TuneError(f"no RPC server is registered under key {self.key!r} at the tracker {self.tracker}; "
                            f"{register_help(self.tracker, self.key)}")
        return len(found)

    def connect(self, session_timeout: float = 600, wait: float = FREE_SERVER_WAIT):
        """An RPC session with the board, or with a free server of the farm (waiting at most `wait` s)."""
        from tvm import rpc

        if self.rpc is not None:
            host, port = parse_address(self.rpc)
            try:
                return rpc.connect(host, port, session_timeout=session_timeout)
            except Exception as e:  # TVMError or socket error: one line with the fix
                raise TuneError(f"cannot reach the RPC server at {self.rpc}: {_last_line(e)}; {RPC_HELP}") from e
        count = self.servers()
        host, port = parse_address(self.tracker, "--tracker")
        tracker = _tracker_session(host, port, 10.0)
        try:
            return tracker.request_within(self.key, wait, session_timeout)
        except TimeoutError as e:
            raise TuneError(f"none of the {count} server(s) under key {self.key!r} at the tracker {self.tracker} "
                            f"became free within {wait:.0f} s (another tune holds them?); wait for it, or "
                            f"{register_help(self.tracker, self.key)}") from e
        except Exception as e:  # the server the tracker gave cannot be reached
            raise TuneError(f"the tracker {self.tracker} gave a server of key {self.key!r} that cannot be "
                            f"reached: {_last_line(e)}; a board behind an SSH tunnel registers with "
                            f"--custom-addr 127.0.0.1 and the same port on both ends (docs/tuning.md)") from e
        finally:
            tracker.close()

    def runner(self, evaluator, workers: int, f_alloc_argument):
        """MetaSchedule's RPCRunner: straight to the board's server, or through the tracker with one worker per
        server (each candidate on whichever server of the key is free)."""
        from tvm.s_tir import meta_schedule as ms

        if self.rpc is not None:
            host, port = parse_address(self.rpc)
            config = ms.runner.RPCConfig(host, port, "bitrl", session_timeout_sec=600)
            return ms.runner.RPCRunner(config, evaluator_config=evaluator, f_create_session=connect_direct,
                                       f_alloc_argument=f_alloc_argument, max_workers=1)
        host, port = parse_address(self.tracker, "--tracker")
        config = ms.runner.RPCConfig(host, port, self.key, session_timeout_sec=600)
        return ms.runner.RPCRunner(config, evaluator_config=evaluator, f_alloc_argument=f_alloc_argument,
                                   max_workers=workers)


class Tracker:
    """TVM's RPC tracker (`tvm.rpc.tracker`'s server loop) on HOST:PORT, in a thread of this process; `port=0`
    picks a free port. TVM's own `Tracker` starts a Python child that imports TVM again (5-15 s); this is
    the same server, started at once. A context manager; `close()` stops it (TVM's STOP message).

        with Tracker("127.0.0.1", 9190) as tracker:     # boards register under keys; tune asks for them
            print(tracker.address, tracker.summary())
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9190):
        try:
            from tvm.rpc import base
            from tvm.rpc.tracker import _tracker_server
        except ImportError as e:
            raise TuneError(f"TVM's RPC tracker needs tornado: pip install tornado ({_last_line(e)})") from e
        self.host = host
        self._stop_key = base.random_key("tracker")
        sock = socket.socket(base.get_addr_family((host, port)), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise TuneError(f"cannot start an RPC tracker on {host}:{port}: {_last_line(e)}; pick another --port "
                            f"(or stop what listens there)") from e
        self.port = sock.getsockname()[1]
        import threading

        self._thread = threading.Thread(target=_tracker_server, args=(sock, self._stop_key), daemon=True,
                                        name=f"rpc-tracker-{self.port}")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _probe(self) -> tuple[str, int]:
        return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host), self.port

    def summary(self) -> dict:
        """The tracker's summary (see tracker_summary)."""
        return tracker_summary("{}:{}".format(*self._probe()))

    def close(self) -> None:
        """Stop the server loop (TVM's STOP message with this tracker's key) and wait for its thread."""
        from tvm.rpc import base

        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        try:
            with socket.create_connection(self._probe(), timeout=10) as sock:
                sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                base.recvall(sock, 4)
                base.sendjson(sock, [base.TrackerCode.STOP, self._stop_key])
                base.recvjson(sock)
        except OSError:
            pass  # already stopped
        thread.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
