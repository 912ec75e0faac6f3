"""Run aarch64 (Raspberry Pi) artifacts on this x86 machine: a real aarch64 Python under qemu-user.

    with EmulatedPolicy("policy.bitrl") as policy:      # rasp4 artifact, qemu -cpu cortex-a72
        action = policy.act(obs)

    with RPCServer("cortex-a72") as server:             # TVM's RPC server, as a Raspberry Pi runs it
        remote = tvm.rpc.connect(server.host, server.port)

Three parts, which depend on bitrl_compile.runtime only:

    sysroot.py    the cached aarch64 Python (Debian's arm64 packages, numpy, tvm-ffi, libtvm_runtime.so)
                  and the guest TVM; the qemu command that runs it for one CPU model
    emulated.py   EmulatedPolicy: a policy.bitrl served by the runtime in that Python (runtime.PolicyLike);
                  open_policy picks it or the native runtime.Policy by the artifact's architecture
    rpc.py        RPCServer: TVM's RPC server (tvm.exec.rpc_server) in that Python, for autotuning

`bitrl-compile emulator setup [--tvm] | python ARGS | rpc-server` is their command line (cli/emulator.py).
"""

from bitrl_compile.devices.emulated import EmulatedPolicy, open_policy, qemu_cpu
from bitrl_compile.devices.rpc import RPCServer
from bitrl_compile.devices.sysroot import (
    DEFAULT_CPU,
    QEMU,
    WHEEL_PLATFORMS,
    Aarch64Python,
    EmulatorError,
    cache_root,
    cpu_features,
    describe_exit,
    ensure_aarch64_python,
    ensure_guest_tvm,
    guest_site,
    qemu_binary,
    qemu_python_command,
    run_python_under_qemu,
)

__all__ = [
    "DEFAULT_CPU", "QEMU", "WHEEL_PLATFORMS", "Aarch64Python", "EmulatedPolicy", "EmulatorError", "RPCServer",
    "cache_root", "cpu_features", "describe_exit", "ensure_aarch64_python", "ensure_guest_tvm",
    "guest_site", "open_policy",
    "qemu_binary", "qemu_cpu", "qemu_python_command", "run_python_under_qemu",
]
