"""`bitrl-compile capi`: the compiler and linker flags of the C API (runtime/capi/bitrl.h), like pkg-config.

    cc app.c $(bitrl-compile capi --cflags --libs) -o app                                  # this machine
    aarch64-linux-gnu-gcc app.c $(bitrl-compile capi --target rasp4 --cflags --libs) -o app   # a Raspberry Pi
"""

from __future__ import annotations

import shlex

import click

from bitrl_compile.cli.common import guard


@click.command("capi")
@click.option("--target", "-t", default="host", show_default=True,
              type=click.Choice(["host", "rasp4", "rasp5", "x86-avx2", "x86-avx512", "x86-amx"]),
              help="the machine the application runs on (rasp4/rasp5: cross-built for aarch64)")
@click.option("--cflags", is_flag=True, help="print the compiler flags (-I for bitrl.h)")
@click.option("--libs", is_flag=True, help="print the linker flags (-L, -lbitrl, -rpath)")
@click.option("--debug", is_flag=True, help="show tracebacks")
def capi_cmd(target, cflags, libs, debug):
    """Build libbitrl for TARGET on first use (cached) and print its flags; without --cflags or --libs, the
    folder holding include/bitrl.h and libbitrl.so. A policy.bitrl then runs from C without Python or TVM."""
    with guard(debug):
        from bitrl_compile.devices.capi import build, capi_flags

        if not (cflags or libs):
            click.echo(build(target))
            return
        compile_flags, link_flags = capi_flags(target)
        click.echo(shlex.join((compile_flags if cflags else []) + (link_flags if libs else [])))
