"""The `bitrl-compile` command.

    bitrl-compile MODEL --target rasp4 -o policy.bitrl     compile (the default command)
    bitrl-compile run policy.bitrl --env CartPole-v1       run episodes (aarch64 under qemu)
    bitrl-compile inspect policy.bitrl                     manifest, layers, bits/weight, sizes
    bitrl-compile train --env CartPole-v1 --steps 100000   PPO (frozen ternary backbone + heads, or a whole MLP)
    bitrl-compile finetune policy.zip --env CartPole-v1    QAT of an fp32 policy so its ternary version keeps the return
    bitrl-compile pretrain-bitnet --env CartPole-v1 --out DIR   a BitNet b1.58 state encoder for train --backbone
    bitrl-compile bench model.zip --env CartPole-v1        memory, latency, energy estimate, return kept: report + plots
    bitrl-compile tune model.zip --target rasp4 --rpc PI:9090   MetaSchedule tuning into targets/tuned/rasp4.json
    bitrl-compile tracker [--port 9190]                    TVM's RPC tracker: tune on a farm (tune --tracker H:P --key rasp4)
    bitrl-compile demo                                     the built-in example, end to end
    bitrl-compile targets                                  the known targets
    bitrl-compile emulator setup | python ARGS | rpc-server   the aarch64 Python under qemu (devices)
    bitrl-compile capi --cflags --libs [--target rasp4]    build flags of the C API (libbitrl), like pkg-config
    bitrl-compile keygen --out NAME | sign policy.bitrl --key NAME   Ed25519 signatures (docs/security.md)

One click group; the commands live by what they do: compile.py (compile, inspect, tune, targets), train.py (train,
finetune, pretrain-bitnet), measure.py (run, bench, bench-kernels, demo), emulator.py (emulator ...), tracker.py, capi.py; common.py
has the error handling they share. Each command calls a function of a lower layer.

Exit codes (also in the README; tests/test_cli.py and tests/test_bad_inputs.py run every row):

    0    success
    1    bad input: a file, name or value the command cannot use; one line on stderr naming the problem and
         the fix (--debug: the traceback)
    2    usage error, click's convention: no arguments, an unknown option or command, a missing or malformed
         option value, a count out of range (`--episodes 0`), `-o` naming a folder
    3    internal error: a bug; one line and a request to report it (--debug: the traceback)
    130  interrupted (Ctrl-C); 128+N when stopped by signal N: 143 for SIGTERM (`timeout`, systemd, CI), 129 for
         SIGHUP. A file being written is removed: nothing partial is left.
    141  stdout closed early (`bitrl-compile inspect x.bitrl | head -1`): quietly, as coreutils and git exit
"""

from __future__ import annotations

import difflib
import errno
import os
import sys

import click

from bitrl_compile import __version__
from bitrl_compile.cli.capi import capi_cmd
from bitrl_compile.cli.common import broken_pipe, fail, interrupted, stop_signals_interrupt, warnings_as_lines
from bitrl_compile.cli.compile import compile_cmd, inspect_cmd, targets_cmd, tune_cmd
from bitrl_compile.cli.emulator import emulator_group
from bitrl_compile.cli.measure import bench_cmd, bench_kernels_cmd, demo_cmd, run_cmd
from bitrl_compile.cli.tracker import tracker_cmd
from bitrl_compile.cli.train import finetune_cmd, pretrain_bitnet_cmd, train_cmd
from bitrl_compile.cli.trust import keygen_cmd, sign_cmd


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a command name, goes to `compile`; and the one place where
    exits get their codes (the table above): SIGTERM/SIGHUP unwind like Ctrl-C, a closed stdout exits quietly."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            close = difflib.get_close_matches(args[0], list(self.commands), n=1, cutoff=0.75)
            if close and not os.path.exists(args[0]):  # `inspct x.bitrl`: a misspelt command, not a model
                ctx.fail(f"no such command {args[0]!r}; did you mean {close[0]!r}? (a model file to compile "
                         f"does not exist under that name either)")
            args = ["compile", *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        with stop_signals_interrupt(), warnings_as_lines():
            try:
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.ClickException as e:  # usage errors: 2
                e.show()
                sys.exit(e.exit_code)
            except click.exceptions.Abort as e:  # click turns Ctrl-C into Abort outside a command's guard
                if isinstance(e.__cause__, KeyboardInterrupt):
                    interrupted(e.__cause__)
                click.echo("Aborted!", err=True)
                sys.exit(1)
            except OSError as e:
                if e.errno != errno.EPIPE:
                    fail(e, debug=False)
                broken_pipe()
            except KeyboardInterrupt as e:
                interrupted(e)
            except SystemExit:
                if type(sys.stdout).__name__ == "_PacifyFlushWrapper":  # click's own EPIPE handling: exit 1
                    broken_pipe()
                raise
            except Exception as e:  # noqa: BLE001 - a command without a guard: still one line and exit 3
                fail(e, debug=False)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_DefaultGroup)
@click.version_option(__version__, prog_name="bitrl-compile")
def main():
    """Compile trained RL policies into ternary (1.58-bit) programs for edge devices."""


for command in (compile_cmd, inspect_cmd, tune_cmd, run_cmd, train_cmd, finetune_cmd, pretrain_bitnet_cmd, targets_cmd,
                bench_cmd, bench_kernels_cmd, demo_cmd, emulator_group, capi_cmd, keygen_cmd, sign_cmd, tracker_cmd):
    main.add_command(command)
