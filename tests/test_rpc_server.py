"""TVM's own RPC server (`python -m tvm.exec.rpc_server`, what a Raspberry Pi 4 runs for MetaSchedule
autotuning) under qemu -cpu cortex-a72: a BitLinear kernel cross-compiled for rasp4 is uploaded through
the session, runs bit for bit like the numpy reference, and is timed by time_evaluator.

Needs qemu-aarch64 and aarch64-linux-gnu-g++; the first run builds the aarch64 Python and the guest TVM
caches (about 40 s, see bitrl_compile/devices/sysroot.py); then about 15 s.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import tvm
import tvm.rpc
from tvm.support import cc

from bitrl_compile import quant, targets
from bitrl_compile.devices import EmulatorError, RPCServer
from bitrl_compile.quant import apply_activation
from bitrl_compile.runtime.weights import pack_tiles
from bitrl_compile.targets import kernels

K, N, ACTIVATION = 64, 32, "relu"
BATCHES = (1, 4, 5)  # GEMV only, one register block, block + 1
NAME = kernels.kernel_name(K, N, ACTIVATION, False)


@pytest.fixture(scope="module")
def server():
    with RPCServer() as s:  # cortex-a72, a free port on 127.0.0.1
        yield s


@pytest.fixture(scope="module")
def rasp4_kernel(tmp_path_factory):
    """The BitLinear kernel for rasp4, exported as the pipeline does (the target's cross compiler)."""
    target = targets.get_target("rasp4")
    tvm_target = targets.tvm_target(target)
    spec = targets.kernel_spec(tvm_target)
    lib = tvm.compile(tvm.IRModule({"main": kernels.bitlinear_kernel(K, N, ACTIVATION, spec=spec)}),
                      target=tvm_target)
    path = tmp_path_factory.mktemp("rpc") / "bitlinear_rasp4.so"
    lib.export_library(str(path), fcompile=cc.cross_compiler(target.cc))
    return spec, path


def _inputs(spec, seed=0):
    rng = np.random.default_rng(seed)
    w_t = rng.integers(-1, 2, (N, K)).astype(np.int8)
    gamma = rng.uniform(0.01, 2, 1).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    rows = max(BATCHES)
    x = (rng.standard_normal((rows, K)) * rng.uniform(0.01, 10, (rows, 1))).astype(np.float32)
    x[0] = 0  # the absmax epsilon
    return w_t, pack_tiles(w_t, spec.layout), gamma, bias, x


def _session(server, path):
    remote = tvm.rpc.connect(server.host, server.port, session_timeout=120)
    remote.upload(str(path))
    return remote, remote.load_module(path.name)


def test_kernel_runs_bit_exact_through_the_rpc_session(server, rasp4_kernel):
    spec, path = rasp4_kernel
    remote, module = _session(server, path)
    dev = remote.cpu()
    w_t, w_packed, gamma, bias, x = _inputs(spec)
    args = [tvm.runtime.tensor(a, dev) for a in (w_packed, gamma, bias)]
    for b in BATCHES:
        y = tvm.runtime.tensor(np.zeros((b, N), np.float32), dev)
        module[NAME](tvm.runtime.tensor(x[:b], dev), *args, y)
        expected = apply_activation(quant.bitlinear_reference(x[:b], w_t, gamma, bias), ACTIVATION)
        np.testing.assert_array_equal(y.numpy(), expected, err_msg=f"batch {b}")


def test_time_evaluator_through_the_session(server, rasp4_kernel):
    spec, path = rasp4_kernel
    remote, module = _session(server, path)
    dev = remote.cpu()
    _, w_packed, gamma, bias, x = _inputs(spec, seed=1)
    args = [tvm.runtime.tensor(a, dev) for a in (x, w_packed, gamma, bias, np.zeros((len(x), N), np.float32))]
    result = module.time_evaluator(NAME, dev, number=5, repeat=3)(*args)
    assert len(result.results) == 3
    assert all(t > 0 for t in result.results), result  # qemu's time, not the device's: no value asserted


def test_unknown_cpu_model_is_a_clear_error():
    with pytest.raises(EmulatorError, match=r"cannot run CPU model 'no-such-cpu'.*-cpu help"):
        RPCServer(cpu="no-such-cpu")


def test_server_that_dies_at_startup_raises_with_its_last_log_line():
    with socket.socket() as taken:  # the server's port is in use: TVM's server exits with a ValueError
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        message = rf"exited with status 1: .*cannot bind to any port in \[{port}, "
        with pytest.raises(EmulatorError, match=message):
            RPCServer(port=port, startup_timeout=120)
