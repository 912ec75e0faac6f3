"""`bitrl-compile emulator`: the aarch64 Python under qemu (bitrl_compile.devices), by hand."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import click


@click.group("emulator")
def emulator_group():
    """The aarch64 Python under qemu that runs rasp4/rasp5 artifacts on this machine (bitrl_compile.devices)."""


@contextmanager
def _emulator_errors():
    """An EmulatorError (qemu missing, a failed build, a guest that died) is one line on stderr and exit code 1."""
    from bitrl_compile.devices import EmulatorError

    try:
        yield
    except EmulatorError as e:
        click.echo(f"bitrl-compile: error: {e}", err=True)
        sys.exit(1)


@emulator_group.command("setup")
@click.option("--tvm", "with_tvm", is_flag=True,
              help="also the guest's full tvm package, which rpc-server needs (about 20 s, 280 MB)")
def emulator_setup_cmd(with_tvm):
    """Build the cached aarch64 Python now (it is otherwise built on first use; about 20 s)."""
    from bitrl_compile.devices import ensure_aarch64_python, ensure_guest_tvm

    with _emulator_errors():
        py = ensure_aarch64_python()
        tvm_site = ensure_guest_tvm() if with_tvm else None
    click.echo(f"aarch64 Python: {py.python}\nsite: {py.site}\nlibtvm_runtime: {py.libtvm_runtime}")
    if tvm_site is not None:
        click.echo(f"tvm site: {tvm_site}")


@emulator_group.command("python", context_settings={"ignore_unknown_options": True,
                                                     "allow_interspersed_args": False})
@click.option("--cpu", help="qemu CPU model [default: cortex-a72, the Raspberry Pi 4]")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def emulator_python_cmd(cpu, args):
    """Run the aarch64 Python under qemu with ARGS (-c CODE, a script, -m MODULE); exits with its status."""
    import subprocess

    from bitrl_compile.devices import DEFAULT_CPU, qemu_python_command

    with _emulator_errors():
        command = qemu_python_command(cpu or DEFAULT_CPU) + list(args)
    sys.exit(subprocess.call(command))


@emulator_group.command("rpc-server")
@click.option("--cpu", help="qemu CPU model [default: cortex-a72, the Raspberry Pi 4]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; keep 127.0.0.1: TVM's RPC server runs any code a client sends, without "
                   "authentication (reach it from elsewhere through `ssh -L`, docs/security.md)")
@click.option("--port", type=int, help="port [default: a free one]")
@click.option("--tracker", metavar="HOST:PORT",
              help="register with TVM's RPC tracker there (a farm for `tune --tracker`; start one with "
                   "`bitrl-compile tracker`)")
@click.option("--key", help="the tracker key to register under [default: the target of the CPU: rasp4 for "
                            "cortex-a72, rasp5 for cortex-a76]")
def emulator_rpc_server_cmd(cpu, host, port, tracker, key):
    """TVM's RPC server in the aarch64 Python under qemu, in the foreground; Ctrl-C stops it."""
    import signal

    from bitrl_compile.devices import DEFAULT_CPU, QEMU, RPCServer, describe_exit

    cpu = cpu or DEFAULT_CPU
    if key is not None and tracker is None:
        raise click.UsageError("--key names the tracker key: pass --tracker HOST:PORT too")
    if tracker is not None and key is None:
        from bitrl_compile import targets

        key = next((n for n in targets.known_targets() if targets.get_target(n).qemu_cpu == cpu), None)
        if key is None:
            raise click.UsageError(f"no target runs on -cpu {cpu}: pass --key KEY (what `tune --key` asks for)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on SIGTERM too (__exit__)
    try:
        with _emulator_errors(), RPCServer(cpu, host=host, port=port, tracker=tracker, key=key) as server:
            where = f", registered under key {key} at the tracker {tracker}" if tracker else ""
            click.echo(f"{server.address}  (TVM RPC server, {QEMU} -cpu {cpu}{where}; Ctrl-C stops it)")
            shown = len(server.log_text())
            while (code := server.wait(timeout=0.5)) is None:
                text = server.log_text()  # the server's log lines (sessions, loaded modules) on stderr
                click.echo(text[shown:], err=True, nl=False)
                shown = len(text)
            click.echo(server.log_text()[shown:], err=True, nl=False)
            click.echo(f"bitrl-compile: error: the server {describe_exit(code, cpu)}", err=True)
            sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(0)

