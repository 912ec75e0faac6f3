"""The `bitrl-compile` command.

    bitrl-compile MODEL --target rasp4 -o policy.bitrl     compile (the default command)
    bitrl-compile run policy.bitrl --env CartPole-v1       run episodes (aarch64 under qemu)
    bitrl-compile inspect policy.bitrl                     manifest, layers, bits/weight, sizes
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
    from bitrl_compile.pipeline import CompileError

    if debug:
        traceback.print_exc()
    user_error = isinstance(e, USER_ERRORS + (CompileError,)) or type(e).__name__ in ("ModelLoadError",)
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
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", default="host", show_default=True, help="rasp4, rasp5, x86-avx2, x86-avx512, host")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="artifact path [default: MODEL stem + .bitrl]")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--env", "env_id", help="gymnasium env id, to read action/observation spaces for bare state_dicts")
@click.option("--vecnormalize", type=click.Path(exists=True, dir_okay=False),
              help="observation statistics to bake in (SB3 vecnormalize.pkl needs --trust-pickle; or JSON/npz)")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--per-channel", is_flag=True, help="one weight scale per output channel instead of per tensor")
@click.option("--force", is_flag=True, help="overwrite the output file")
@click.option("--debug", is_flag=True, help="show tracebacks")
def compile_cmd(model, target, output, config, env_id, vecnormalize, trust_pickle, per_channel, force, debug):
    """Compile MODEL (torch .pt/.pt2, TorchScript, safetensors, SB3 .zip, CleanRL, ONNX) for a target."""
    with _guard(debug):
        from bitrl_compile.frontends import load_policy
        from bitrl_compile.pipeline import compile_policy

        out = Path(output) if output else Path(model).with_suffix(".bitrl")
        cfg = json.loads(Path(config).read_text()) if config else None
        if env_id:
            cfg = dict(cfg or {}, env=env_id)
        t0 = time.perf_counter()
        loaded = load_policy(model, config=cfg, trust_pickle=trust_pickle, vecnormalize=vecnormalize)
        result = compile_policy(loaded, target, out, per_channel=per_channel, force=force,
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


def open_policy(path: str):
    """A runtime Policy for this machine, or an emulated one for an aarch64 artifact on x86."""
    from bitrl_compile.runtime.artifact import read_artifact
    from bitrl_compile.runtime.policy import host_arch, load

    manifest = read_artifact(path).manifest
    if manifest["target"]["arch"] != host_arch():
        from bitrl_compile.emulator import EmulatedPolicy

        cpu = {"rasp4": "cortex-a72", "rasp5": "cortex-a76"}.get(manifest["target"]["name"], "cortex-a72")
        return EmulatedPolicy(path, cpu=cpu)
    return load(path)


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
        from bitrl_compile.evaluate import evaluate

        policy = open_policy(artifact)
        t0 = time.perf_counter()
        returns, steps = evaluate(lambda obs: policy.act(obs, deterministic=not stochastic), env_id,
                                  episodes, seed, progress=True)
        dt = time.perf_counter() - t0
        import numpy as np

        emulated = " (emulated under qemu)" if type(policy).__name__ == "EmulatedPolicy" else ""
        click.echo(f"{env_id}: mean return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {episodes} "
                   f"episodes, {steps} steps in {dt:.1f} s{emulated}")
        if hasattr(policy, "close"):
            policy.close()


@main.command("targets")
def targets_cmd():
    """List the known targets."""
    from bitrl_compile import targets

    for name in targets.known_targets():
        t = targets.get_target(name)
        click.echo(f"{name:<11} {t.device}  [{t.arch}, {'cross: ' + t.cc if t.cc else 'host compiler'}]")


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
