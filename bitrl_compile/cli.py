"""The `bitrl-compile` command.

    bitrl-compile MODEL --target rasp4 -o policy.bitrl     compile (the default command)
    bitrl-compile run policy.bitrl --env CartPole-v1       run episodes (aarch64 under qemu)
    bitrl-compile inspect policy.bitrl                     manifest, layers, bits/weight, sizes
    bitrl-compile train --env CartPole-v1 --steps 100000   PPO (frozen ternary backbone + heads, or a whole MLP)
    bitrl-compile finetune policy.zip --env CartPole-v1    QAT of an fp32 policy so its ternary version keeps the return
    bitrl-compile bench model.zip --env CartPole-v1        memory, latency, energy estimate, return kept: report + plots
    bitrl-compile tune model.zip --target rasp4 --rpc PI:9090   MetaSchedule tuning into targets/tuned/rasp4.json
    bitrl-compile demo                                     the built-in example, end to end
    bitrl-compile targets                                  the known targets

Exit codes: 0 success; 1 bad input (one line on stderr, no traceback unless --debug); 2 internal error.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import click

from bitrl_compile import __version__

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a command name, goes to `compile`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


def _fail(e: BaseException, debug: bool) -> None:
    from bitrl_compile.loaded import ModelLoadError
    from bitrl_compile.pipeline import CompileError

    if debug:
        traceback.print_exc()
    user_error = isinstance(e, USER_ERRORS + (CompileError, ModelLoadError))
    if isinstance(e, RuntimeError) and not isinstance(e, CompileError) and "install" in str(e):
        user_error = True  # a missing tool: the message says what to install
    name = "error" if user_error else "internal error"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    click.echo(f"bitrl-compile: {name}: {text}", err=True)
    if not user_error and not debug:
        click.echo("(rerun with --debug for the traceback, and please report it)", err=True)
    sys.exit(1 if user_error else 2)


def _guard(debug: bool):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, kind, e, tb):
            if e is None or isinstance(e, (SystemExit, click.exceptions.Exit, click.ClickException)):
                return False
            if isinstance(e, KeyboardInterrupt):
                click.echo("bitrl-compile: interrupted; nothing was written", err=True)
                sys.exit(130)
            _fail(e, debug)
            return True

    return _Ctx()


@click.group(cls=_DefaultGroup)
@click.version_option(__version__, prog_name="bitrl-compile")
def main():
    """Compile trained RL policies into ternary (1.58-bit) programs for edge devices."""


@main.command("compile")
@click.argument("model", type=click.Path())
@click.option("--target", "-t", default="host", show_default=True, help="rasp4, rasp5, x86-avx2, x86-avx512, x86-amx, host")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="artifact path [default: MODEL stem + .bitrl]")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--env", "env_id", help="gymnasium env id, to read action/observation spaces for bare state_dicts")
@click.option("--vecnormalize", type=click.Path(exists=True, dir_okay=False),
              help="observation statistics to bake in (SB3 vecnormalize.pkl needs --trust-pickle; or JSON/npz)")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--per-channel", is_flag=True, help="one weight scale per output channel instead of per tensor")
@click.option("--features", is_flag=True, help="compile the MLP's torso (all layers but the last) as a backbone "
              "whose output is features (policy.features(obs)), for `bitrl-compile train --backbone`")
@click.option("--bundle-runtime", is_flag=True,
              help="put the target's libtvm_runtime.so (3 MB) in the artifact: the device then needs only "
                   "`pip install apache-tvm-ffi numpy`")
@click.option("--db", "tuning_db", type=click.Path(file_okay=False),
              help="folder of tuning databases (<target>.json) [default: the repository's targets/tuned]")
@click.option("--no-tuning", is_flag=True, help="use the default kernel schedules, ignoring tuning databases")
@click.option("--qat", "qat_env", metavar="ENV",
              help="first fine-tune the fp32 policy with quantization-aware training on gymnasium ENV (as "
                   "`bitrl-compile finetune` does; writes MODEL stem + -ternary.safetensors), then compile that: "
                   "for policies whose plain ternary version loses return")
@click.option("--qat-steps", type=click.IntRange(min=1), help="QAT steps [default: a quarter of ENV's preset]")
@click.option("--force", is_flag=True, help="overwrite the output file")
@click.option("--debug", is_flag=True, help="show tracebacks")
def compile_cmd(model, target, output, config, env_id, vecnormalize, trust_pickle, per_channel, features,
                bundle_runtime, tuning_db, no_tuning, qat_env, qat_steps, force, debug):
    """Compile MODEL (torch .pt/.pt2, TorchScript, safetensors, SB3 .zip, CleanRL, ONNX, BitNet backbone folder)."""
    with _guard(debug):
        from bitrl_compile.frontends import load_policy
        from bitrl_compile.pipeline import compile_policy

        out = Path(output) if output else Path(model).with_suffix(".bitrl") if not Path(model).is_dir() \
            else Path(model).with_name(Path(model).name + ".bitrl")  # a BitNet backbone folder
        if qat_env:  # the fine-tuned file carries its architecture and observation statistics
            tuned = Path(model).with_name(Path(model).stem + "-ternary.safetensors")
            logs = Path(model).with_name(Path(model).stem + "-qat")  # beside the model, not in the cwd
            click.get_current_context().invoke(finetune_cmd, model=model, env_id=qat_env, steps=qat_steps,
                                               output=str(tuned), out=str(logs), config=config, vecnormalize=vecnormalize,
                                               trust_pickle=trust_pickle, force=force, no_progress=True,
                                               debug=debug)
            model, config, vecnormalize = str(tuned), None, None
        cfg = json.loads(Path(config).read_text()) if config else None
        if env_id:
            cfg = dict(cfg or {}, env=env_id)
        t0 = time.perf_counter()
        loaded = load_policy(model, config=cfg, trust_pickle=trust_pickle, vecnormalize=vecnormalize)
        if features:
            from bitrl_compile.trainers.ppo import features_policy

            loaded = features_policy(loaded)
        result = compile_policy(loaded, target, out, per_channel=per_channel, force=force,
                                bundle_runtime=bundle_runtime, tuning_db=tuning_db, tuning=not no_tuning,
                                log=lambda s: click.echo(f"  {s}", err=True))
        click.echo(_summary(result.manifest, out, time.perf_counter() - t0))


def _summary(manifest: dict, path: Path, seconds: float | None = None) -> str:
    layers = manifest["layers"]
    n_weights = sum(layer["in"] * layer["out"] for layer in layers)
    size = path.stat().st_size
    lines = [f"{path}: {size:,} bytes, target {manifest['target']['name']} ({manifest['target']['device']})"]
    lines.append(f"  {len(layers)} BitLinear layers, {n_weights:,} ternary weights "
                 f"({4 * n_weights:,} bytes as fp32)")
    for layer in layers:
        lines.append(f"    {layer['name']:<12} {layer['in']:>6} -> {layer['out']:<6} {layer['activation']:<8} "
                     f"{layer['layout']} ({layer['weight_bits_per_param']:g} bits/weight), {layer['scale']}")
    for kernel in manifest.get("kernels", []):
        knobs = " ".join(f"{k}={v}" for k, v in kernel["knobs"].items() if v != 1) or "default knobs"
        where = (", ".join(f"{p} tuned at batch {kernel[p]['batch']}: {kernel[p]['us']:g} µs vs default "
                           f"{kernel[p]['default_us']:g} µs" for p in ("gemv", "gemm") if p in kernel)
                 if kernel["schedule"] == "tuned" else f"default schedule: {kernel.get('reason', 'tuning off')}")
        lines.append(f"    kernel {kernel['kernel']:<36} {kernel['isa']:<12} {knobs}; {where}")
    if seconds is not None:
        lines.append(f"  compiled in {seconds:.1f} s")
    return "\n".join(lines)


@main.command("inspect")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
@click.option("--debug", is_flag=True)
def inspect_cmd(artifact, as_json, debug):
    """Show an artifact's manifest, layers, bits per weight and member sizes."""
    with _guard(debug):
        from bitrl_compile.runtime.artifact import read_artifact

        art = read_artifact(artifact)
        if as_json:
            click.echo(json.dumps(art.manifest, indent=2, sort_keys=True))
            return
        m = art.manifest
        click.echo(_summary(m, Path(artifact)))
        click.echo(f"  format v{m['format_version']}, compiled by bitrl-compile {m['versions']['bitrl_compile']} "
                   f"with TVM {m['versions']['tvm']}; source: {m['source']['format']}")
        click.echo(f"  input: shape {m['input']['shape']}, preprocess {m['input'].get('preprocess', 'none')}, "
                   f"normalisation {'baked in' if m['input'].get('normalize') else 'none'}")
        click.echo(f"  output: {json.dumps(m['output'])}")
        for name, blob in art.members.items():
            click.echo(f"  member {name:<20} {len(blob):>10,} bytes  sha256 {m['members'][name][:16]}…")
        stats = m.get("stats", {})
        if stats.get("ternary_weights"):
            bits = 8 * stats["param_bytes"] / stats["ternary_weights"]
            click.echo(f"  parameters: {stats['param_bytes']:,} bytes = {bits:.2f} bits per weight incl. scales/bias")


@main.command("tune")
@click.argument("model", type=click.Path())
@click.option("--target", "-t", default="host", show_default=True, help="rasp4, rasp5, x86-avx2, x86-avx512, x86-amx, host")
@click.option("--trials", default=32, show_default=True, help="MetaSchedule trials per kernel and batch")
@click.option("--batch", "batches", default="1", show_default=True,
              help="batch sizes to tune, comma-separated: 1 tunes the policy step (GEMV), e.g. 32 the GEMM rows")
@click.option("--db", "tuning_db", type=click.Path(file_okay=False),
              help="folder of tuning databases to update (<target>.json) [default: the repository's targets/tuned]")
@click.option("--rpc", help="HOST:PORT of `python3 -m tvm.exec.rpc_server` on the device (needed for rasp4/rasp5)")
@click.option("--threads", default=1, show_default=True, help="kernel threads while measuring")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--env", "env_id", help="gymnasium env id, to read action/observation spaces for bare state_dicts")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--per-channel", is_flag=True, help="tune the per-output-channel-scale kernels")
@click.option("--seed", default=0, show_default=True)
@click.option("--debug", is_flag=True, help="show tracebacks")
def tune_cmd(model, target, trials, batches, tuning_db, rpc, threads, config, env_id, trust_pickle, per_channel,
             seed, debug):
    """Tune MODEL's BitLinear kernels for a target with MetaSchedule and store the result in the
    target's tuning database, which later compiles apply. Ctrl-C keeps what was found."""
    with _guard(debug):
        from bitrl_compile.frontends import load_policy
        from bitrl_compile.pipeline import kernel_keys
        from bitrl_compile.targets import tuning

        try:
            sizes = [int(b) for b in batches.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"--batch expects comma-separated integers, got {batches!r}") from None
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--batch expects batch sizes of at least 1, got {batches!r}")
        cfg = json.loads(Path(config).read_text()) if config else None
        if env_id:
            cfg = dict(cfg or {}, env=env_id)
        loaded = load_policy(model, config=cfg, trust_pickle=trust_pickle)
        keys = kernel_keys(loaded, per_channel)
        rows, path, seconds = tuning.tune(keys, target, trials=trials, batches=sizes, db=tuning_db, rpc=rpc,
                                          threads=threads, seed=seed, log=lambda s: click.echo(s, err=True))
        click.echo(tuning.summary(rows))
        click.echo(f"tuned {len(keys)} kernel(s) x {len(sizes)} batch size(s) in {seconds:.0f} s; "
                   f"database {path} (compiles for {target} now use it)")


@main.command("run")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--env", "env_id", required=True, help="gymnasium environment id, e.g. CartPole-v1")
@click.option("--episodes", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--stochastic", is_flag=True, help="sample actions instead of the deterministic action")
@click.option("--debug", is_flag=True)
def run_cmd(artifact, env_id, episodes, seed, stochastic, debug):
    """Run ARTIFACT in a gymnasium environment and report the returns."""
    with _guard(debug):
        from bitrl_compile.devices import open_policy
        from bitrl_compile.evaluate import evaluate
        from bitrl_compile.runtime.policy import host_arch

        policy = open_policy(artifact)
        t0 = time.perf_counter()
        returns, steps = evaluate(lambda obs: policy.act(obs, deterministic=not stochastic), env_id,
                                  episodes, seed, progress=True)
        dt = time.perf_counter() - t0
        import numpy as np

        emulated = " (emulated under qemu)" if policy.manifest["target"]["arch"] != host_arch() else ""
        click.echo(f"{env_id}: mean return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {episodes} "
                   f"episodes, {steps} steps in {dt:.1f} s{emulated}")
        policy.close()


@main.command("train")
@click.option("--env", "env_id", required=True, help="gymnasium environment id, e.g. CartPole-v1")
@click.option("--steps", type=click.IntRange(min=1), help="environment steps [default: the env's preset]")
@click.option("--backbone", type=click.Path(),
              help="frozen backbone: a policy file (its ternary torso, in torch), a BitNet backbone folder (torch) "
              "or a features .bitrl (runtime)")
@click.option("--heads-bits", type=click.Choice(["32", "8", "1.58"]), default="32", show_default=True,
              help="head weights: fp32, int8, or ternary (straight-through QAT)")
@click.option("--hidden", help="head widths, comma-separated [default: 64,64; 64 with a backbone]")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), help="output folder [default: runs/ENV-seedS]")
@click.option("--num-envs", type=click.IntRange(min=1), help="parallel environments [default: the env's preset]")
@click.option("--eval-episodes", default=10, show_default=True)
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--debug", is_flag=True)
def train_cmd(env_id, steps, backbone, heads_bits, hidden, seed, out, num_envs, eval_episodes, no_progress, debug):
    """Train a policy with PPO (heads on a frozen ternary backbone, or a whole MLP), with logs and a plot."""
    with _guard(debug):
        import numpy as np

        from bitrl_compile.trainers import ppo

        if backbone and not Path(backbone).exists():
            raise FileNotFoundError(f"{backbone}: no such backbone; give a policy file, a BitNet backbone folder "
                                    "or a features .bitrl")
        overrides = {"seed": seed, "heads_bits": float(heads_bits), "backbone": backbone,
                     "eval_episodes": eval_episodes, "progress": not no_progress,
                     "out": out or f"runs/{env_id}-seed{seed}"}
        if steps:
            overrides["total_timesteps"] = steps
        if num_envs:
            overrides["num_envs"] = num_envs
        if hidden:
            overrides["hidden"] = _widths(hidden)
        _check_env(env_id)
        result = ppo.train(ppo.args_for(env_id, **overrides), log=lambda s: click.echo(s, err=True))
        click.echo(f"{env_id}: deterministic return {np.mean(result.eval_returns):.1f} ± "
                   f"{np.std(result.eval_returns):.1f} over {len(result.eval_returns)} episodes after "
                   f"{result.global_step} steps")
        click.echo(f"  {result.out}/policy.safetensors  (compile: bitrl-compile {result.out}/policy.safetensors)")
        click.echo(f"  {result.out}/learning_curve.png, progress.csv, checkpoint.safetensors")


@main.command("finetune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--env", "env_id", required=True, help="the gymnasium environment the policy was trained on")
@click.option("--steps", type=click.IntRange(min=1), help="QAT steps [default: half the env's preset]")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="fine-tuned policy [default: MODEL stem + -ternary.safetensors]")
@click.option("--out", type=click.Path(file_okay=False), help="run folder for logs [default: runs/finetune-ENV]")
@click.option("--episodes", default=20, show_default=True, help="evaluation episodes before and after")
@click.option("--seed", default=0, show_default=True)
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--vecnormalize", type=click.Path(exists=True, dir_okay=False), help="observation statistics")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--force", is_flag=True, help="overwrite the output file")
@click.option("--no-progress", is_flag=True)
@click.option("--debug", is_flag=True)
def finetune_cmd(model, env_id, steps, output, out, episodes, seed, config, vecnormalize, trust_pickle, force,
                 no_progress, debug):
    """Quantization-aware fine-tune of an fp32 MLP policy so that its ternary version keeps the return."""
    with _guard(debug):
        import numpy as np

        from bitrl_compile.evaluate import evaluate
        from bitrl_compile.frontends import load_policy
        from bitrl_compile.runtime.artifact import write_atomic
        from bitrl_compile.trainers import ppo

        output = Path(output) if output else Path(model).with_name(Path(model).stem + "-ternary.safetensors")
        if output.exists() and not force:
            raise FileExistsError(f"{output} exists; pass --force to overwrite it")
        _check_env(env_id)
        cfg = json.loads(Path(config).read_text()) if config else None

        def load():
            return load_policy(model, config=cfg, trust_pickle=trust_pickle, vecnormalize=vecnormalize)

        def mean(act):
            returns, _ = evaluate(act, env_id, episodes, 10_000)
            return f"{np.mean(returns):.1f} ± {np.std(returns):.1f}"

        before = load()
        ppo.check_policy_fits(before, env_id, model)
        click.echo(f"before: fp32 {mean(ppo.reference_act(before, ternary=False))}, ternary (PTQ) "
                   f"{mean(ppo.reference_act(before))}  ({episodes} episodes)")
        overrides = {"seed": seed, "progress": not no_progress, "eval_episodes": episodes,
                     "out": out or f"runs/finetune-{env_id}-seed{seed}"}
        if steps:
            overrides["total_timesteps"] = steps
        result = ppo.train(ppo.finetune_args(env_id, str(model), **overrides),
                           log=lambda s: click.echo(s, err=True), init_loaded=before)
        write_atomic(output, (result.out / "policy.safetensors").read_bytes())  # whole or not at all
        click.echo(f"after {result.global_step} QAT steps: ternary {mean(ppo.reference_act(load_policy(output)))}")
        click.echo(f"  {output}  (compile: bitrl-compile {output})")


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"--hidden {text!r}: give comma-separated integers, e.g. 64,64") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"--hidden {text!r}: widths must be positive integers")
    return widths


def _check_env(env_id: str) -> None:
    import gymnasium

    if env_id not in gymnasium.registry:
        raise ValueError(f"unknown environment {env_id!r}; give a gymnasium id such as CartPole-v1")


@main.command("targets")
def targets_cmd():
    """List the known targets."""
    from bitrl_compile import targets

    for name in targets.known_targets():
        t = targets.get_target(name)
        click.echo(f"{name:<11} {t.device}  [{t.arch}, {'cross: ' + t.cc if t.cc else 'host compiler'}]")


@main.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default="host", show_default=True, help="rasp4, rasp5, x86-avx2, x86-avx512, x86-amx, host")
@click.option("--env", "env_id", help="gymnasium env id: measure the return kept (and spaces for bare state_dicts)")
@click.option("--episodes", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1), help="the second batch size")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="threads for every implementation")
@click.option("--calls", default=2000, show_default=True, type=click.IntRange(min=10),
              help="timed act() calls per implementation and batch size")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="out/bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--debug", is_flag=True)
def bench_cmd(model, target, env_id, episodes, batch, threads, calls, seed, out, config, trust_pickle, debug):
    """Measure what MODEL gains as a ternary artifact: memory, latency, energy estimate, return kept."""
    with _guard(debug):
        from bitrl_compile.bench.report import run_bench, summary_lines

        cfg = json.loads(Path(config).read_text()) if config else None
        report = run_bench(model, target=target, env_id=env_id, episodes=episodes, batch=batch, threads=threads,
                           out=Path(out), calls=calls, seed=seed, config=cfg, trust_pickle=trust_pickle,
                           log=lambda s: click.echo(s, err=True))
        click.echo("\n".join(summary_lines(report)[2:]))
        click.echo(f"report: {Path(out) / 'report.md'} (data: report.json; plots: {', '.join(report['plots'])})")


@main.command("bench-kernels", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_kernels_cmd(args):
    """One BitLinear layer, ours vs torch, ONNX Runtime fp32/int8, TVM fp32 (same as bench/kernels.py; --help)."""
    from bitrl_compile.bench.kernels import main as bench_kernels

    sys.exit(bench_kernels(list(args)))


@main.command("demo")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--episodes", default=10, show_default=True)
@click.option("--targets", "target_names", default="host,rasp4", show_default=True)
@click.option("--debug", is_flag=True)
def demo_cmd(out, episodes, target_names, debug):
    """Compile the built-in CartPole policy for host and rasp4, run both, print one table."""
    with _guard(debug):
        from bitrl_compile.demo import run_demo

        click.echo(run_demo(Path(out), episodes, target_names.split(","), log=lambda s: click.echo(s, err=True)))


if __name__ == "__main__":
    main()
