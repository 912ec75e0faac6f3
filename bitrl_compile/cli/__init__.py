"""The `bitrl-compile` command.

    bitrl-compile MODEL --target rasp4 -o policy.bitrl     compile (the default command)
    bitrl-compile run policy.bitrl --env CartPole-v1       run episodes (aarch64 under qemu)
    bitrl-compile inspect policy.bitrl                     manifest, layers, bits/weight, sizes
    bitrl-compile train --env CartPole-v1 --steps 100000   PPO (frozen ternary backbone + heads, or a whole MLP)
    bitrl-compile finetune policy.zip --env CartPole-v1    QAT of an fp32 policy so its ternary version keeps the return
    bitrl-compile pretrain-bitnet --env CartPole-v1 --out DIR   a BitNet b1.58 state encoder for train --backbone
    bitrl-compile bench model.zip --env CartPole-v1        memory, latency, energy estimate, return kept: report + plots
    bitrl-compile tune model.zip --target rasp4 --rpc PI:9090   MetaSchedule tuning into targets/tuned/rasp4.json
    bitrl-compile demo                                     the built-in example, end to end
    bitrl-compile targets                                  the known targets
    bitrl-compile emulator setup | python ARGS | rpc-server   the aarch64 Python under qemu (devices)
    bitrl-compile capi --cflags --libs [--target rasp4]    build flags of the C API (libbitrl), like pkg-config

One click group; the commands live by what they do: compile.py (compile, inspect, tune, targets), train.py (train,
finetune, pretrain-bitnet), measure.py (run, bench, bench-kernels, demo), emulator.py (emulator ...), capi.py; common.py
has the error handling they share. Each command calls a function of a lower layer.

Exit codes: 0 success; 1 bad input (one line on stderr, no traceback unless --debug); 2 internal error.
"""

from __future__ import annotations

import click

from bitrl_compile import __version__
from bitrl_compile.cli.capi import capi_cmd
from bitrl_compile.cli.compile import compile_cmd, inspect_cmd, targets_cmd, tune_cmd
from bitrl_compile.cli.emulator import emulator_group
from bitrl_compile.cli.measure import bench_cmd, bench_kernels_cmd, demo_cmd, run_cmd
from bitrl_compile.cli.train import finetune_cmd, pretrain_bitnet_cmd, train_cmd


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a command name, goes to `compile`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup)
@click.version_option(__version__, prog_name="bitrl-compile")
def main():
    """Compile trained RL policies into ternary (1.58-bit) programs for edge devices."""


for command in (compile_cmd, inspect_cmd, tune_cmd, run_cmd, train_cmd, finetune_cmd, pretrain_bitnet_cmd, targets_cmd,
                bench_cmd, bench_kernels_cmd, demo_cmd, emulator_group, capi_cmd):
    main.add_command(command)
