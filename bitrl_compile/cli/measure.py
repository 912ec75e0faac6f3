"""Commands that run and measure: run (episodes), bench (the report), bench-kernels, demo."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from bitrl_compile.cli.common import guard, removed_if_failed


@click.command("run")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--env", "env_id", required=True, help="gymnasium environment id, e.g. CartPole-v1")
@click.option("--episodes", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="episode i is reset with this seed + i")
@click.option("--stochastic", is_flag=True, help="sample actions instead of the deterministic action")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="a public key (PEM) whose signature ARTIFACT must carry (repeatable; also BITRL_TRUSTED_KEYS)")
@click.option("--debug", is_flag=True)
def run_cmd(artifact, env_id, episodes, seed, stochastic, trusted_keys, debug):
    """Run ARTIFACT in a gymnasium environment and report the returns."""
    with guard(debug):
        from bitrl_compile.devices import open_policy
        from bitrl_compile.evaluate import actor, evaluate
        from bitrl_compile.runtime.policy import host_arch

        policy = open_policy(artifact, trusted_keys)
        try:
            t0 = time.perf_counter()
            returns, steps = evaluate(actor(policy, deterministic=not stochastic), env_id, episodes, seed,
                                      progress=True)
            dt = time.perf_counter() - t0
        finally:
            policy.close()
        import numpy as np

        emulated = " (emulated under qemu)" if policy.manifest["target"]["arch"] != host_arch() else ""
        click.echo(f"{env_id}: mean return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {episodes} "
                   f"episodes, {steps} steps in {dt:.1f} s{emulated}")


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default="host", show_default=True, help="rasp4, rasp5, x86-avx2, x86-avx512, x86-amx, host")
@click.option("--env", "env_id", help="gymnasium env id: measure the return kept (and spaces for bare state_dicts)")
@click.option("--episodes", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1), help="the second batch size")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="threads for every implementation")
@click.option("--calls", default=2000, show_default=True, type=click.IntRange(min=10),
              help="timed act() calls per implementation and batch size")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--out", default="out/bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--debug", is_flag=True)
def bench_cmd(model, target, env_id, episodes, batch, threads, calls, seed, out, config, trust_pickle, debug):
    """Measure what MODEL gains as a ternary artifact: memory, latency, energy estimate, return kept."""
    with guard(debug):
        from bitrl_compile.bench.markdown import summary_lines
        from bitrl_compile.bench.report import run_bench

        cfg = json.loads(Path(config).read_text()) if config else None
        with removed_if_failed(out):
            report = run_bench(model, target=target, env_id=env_id, episodes=episodes, batch=batch,
                               threads=threads, out=Path(out), calls=calls, seed=seed, config=cfg,
                               trust_pickle=trust_pickle, log=lambda s: click.echo(s, err=True))
        click.echo("\n".join(summary_lines(report)[2:]))
        click.echo(f"report: {Path(out) / 'report.md'} (data: report.json; plots: {', '.join(report['plots'])})")


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _given_args(ctx: click.Context) -> list[str]:
    """The options given on the command line, spelled as arguments again (to print and to rerun the command)."""
    args = []
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            args += [param.opts[0]] if value else []
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
                else str(value)
            args += [param.opts[0], text]
    return args


@click.command("bench-kernels")
@click.option("--sizes", default="64,256,1024,4096", show_default=True, callback=_int_list,
              help="N = K of the square layers, comma-separated")
@click.option("--batches", default="1,32", show_default=True, callback=_int_list, help="batch sizes, comma-separated")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="threads for every implementation")
@click.option("--rounds", default=7, show_default=True, type=click.IntRange(min=1),
              help="rounds of timed calls; a time is the median over the rounds")
@click.option("--block-ms", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="each round times a block of calls lasting at least this long, per implementation")
@click.option("--impls", help="baselines to run, comma-separated: lut, torch, ort_fp32, ort_int8, tvm_fp32 "
                              "[default: all; ours always runs]")
@click.option("--no-arm", is_flag=True, help="skip the rasp4/rasp5 instruction counts under qemu")
@click.option("--conv", is_flag=True, help="also NatureCNN's three convolutions per layer, at --batches, 1 thread "
                                           "(ours, torch, ORT fp32 and int8 dynamic / static)")
@click.option("--json", "json_path", default="bench-kernels.json", show_default=True,
              type=click.Path(dir_okay=False), help="where to write the results")
@click.pass_context
def bench_kernels_cmd(ctx, sizes, batches, threads, rounds, block_ms, impls, no_arm, conv, json_path):
    """One BitLinear layer, ours vs torch, ONNX Runtime fp32/int8 and TVM fp32, same threads (docs/kernels.md).

    Prints µs per call (CPU time of the calling thread at one thread, else wall clock), bits per weight,
    the bandwidth bound and, for rasp4/rasp5, instructions per call under qemu; writes all of it to --json.
    """
    with guard(False):
        from bitrl_compile.bench.kernels import bench_kernels

        sys.exit(bench_kernels(_given_args(ctx), sizes=sizes, batches=batches, threads=threads, rounds=rounds,
                               block_ms=block_ms, impls=[i for i in impls.split(",") if i] if impls else None,
                               arm=not no_arm, json_path=json_path, conv=conv, log=click.echo))


@click.command("demo")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--episodes", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--targets", "target_names", default="host,rasp4", show_default=True)
@click.option("--debug", is_flag=True)
def demo_cmd(out, episodes, target_names, debug):
    """Compile the built-in CartPole policy for host and rasp4, run both, print one table."""
    with guard(debug), removed_if_failed(out):  # a failed demo leaves no empty --out folder
        from bitrl_compile.demo import run_demo

        click.echo(run_demo(Path(out), episodes, target_names.split(","), log=lambda s: click.echo(s, err=True)))

