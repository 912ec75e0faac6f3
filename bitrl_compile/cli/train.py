"""Commands that train: train (PPO), finetune (distillation or PPO QAT), pretrain-bitnet."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bitrl_compile.cli.bitnet_options import encoder_choice, encoder_options, stock_backbone_folder
from bitrl_compile.cli.common import check_env, guard, option_value, removed_if_failed, widths


@click.command("train")
@click.option("--env", "env_id", required=True, help="gymnasium environment id, e.g. CartPole-v1")
@click.option("--steps", type=click.IntRange(min=1), help="environment steps [default: the env's preset]")
@click.option("--vec", type=click.Choice(["auto", "sync", "async", "envpool"]), default="auto", show_default=True,
              help="vector envs: sync (one process), async (gymnasium AsyncVectorEnv, a process per env), envpool "
                   "(when installed); auto: async with more than one core, more than one env and an env step "
                   "costlier than 1 ms (a pipe round trip and a context switch), else sync")
@click.option("--backbone", type=click.Path(),
              help="frozen backbone: a policy file (its ternary torso, in torch), a BitNet backbone folder (torch), "
              "a stock Hugging Face BitNet checkpoint folder with --encoder, or a features .bitrl (runtime)")
@click.option("--heads-bits", type=click.Choice(["32", "8", "1.58"]), default="32", show_default=True,
              help="head weights: fp32, int8, or ternary (straight-through QAT)")
@click.option("--hidden", callback=option_value(widths),
              help="head widths, comma-separated [default: 64,64; 64 with a backbone]")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--out", type=click.Path(file_okay=False), help="output folder [default: runs/ENV-seedS]")
@click.option("--num-envs", type=click.IntRange(min=1), help="parallel environments [default: the env's preset]")
@click.option("--eval-episodes", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--num-steps", type=click.IntRange(min=1), help="rollout length per environment")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True))
@click.option("--anneal-lr/--no-anneal-lr", default=None, help="decay the learning rate linearly to 0")
@click.option("--anneal-clip/--no-anneal-clip", default=None, help="decay the clip range linearly to 0")
@click.option("--gamma", type=click.FloatRange(0, 1), help="discount")
@click.option("--gae-lambda", type=click.FloatRange(0, 1))
@click.option("--num-minibatches", type=click.IntRange(min=1))
@click.option("--update-epochs", type=click.IntRange(min=1))
@click.option("--norm-adv/--no-norm-adv", default=None, help="normalise advantages per minibatch")
@click.option("--clip-coef", type=click.FloatRange(min=0, min_open=True), help="surrogate clipping")
@click.option("--clip-vloss/--no-clip-vloss", default=None, help="clip the value loss (CleanRL; SB3 does not)")
@click.option("--ent-coef", type=click.FloatRange(min=0), help="entropy bonus")
@click.option("--vf-coef", type=click.FloatRange(min=0), help="value loss coefficient")
@click.option("--max-grad-norm", type=click.FloatRange(min=0, min_open=True))
@click.option("--target-kl", type=click.FloatRange(min=0, min_open=True),
              help="stop an update's epochs when the approximate KL exceeds this")
@click.option("--norm-obs/--no-norm-obs", default=None, help="running observation statistics (no backbone)")
@click.option("--norm-reward/--no-norm-reward", default=None, help="scale rewards by the return's running std")
@click.option("--clip-obs", type=click.FloatRange(min=0, min_open=True), help="clip normalised observations to +-this")
@click.option("--clip-reward", type=click.FloatRange(min=0, min_open=True), help="clip normalised rewards to +-this")
@click.option("--activation", help="head activation: relu, tanh, ...")
@click.option("--init-policy", type=click.Path(exists=True, dir_okay=False),
              help="start the actor from this MLP policy (what `finetune` does)")
@click.option("--critic-warmup", type=click.IntRange(min=0), help="first iterations train only the critic")
@click.option("--distill-coef", type=click.FloatRange(min=0), help="+ coef * KL(initial policy || trained policy)")
@click.option("--eval-every", type=click.IntRange(min=0), help="steps between evaluations (0: at the end only)")
@click.option("--eval-seed", type=click.IntRange(min=0), help="evaluation episode i is reset with this seed + i")
@click.option("--tensorboard/--no-tensorboard", default=None, help="TensorBoard events (when it is installed)")
@click.option("--torch-threads", type=click.IntRange(min=1))
@encoder_options
@click.option("--debug", is_flag=True)
def train_cmd(env_id, steps, heads_bits, hidden, seed, out, no_progress, debug, **options):
    """Train a policy with PPO (heads on a frozen ternary backbone, or a whole MLP), with logs and a plot. A
    hyperparameter not given keeps the env's preset: RL Zoo's published PPO settings (trainers/presets.py), or SB3's
    PPO defaults for an env without one. The settings used are printed."""
    bitnet_encoder = encoder_choice(options["backbone"], env_id, options.pop("encoder"), options.pop("pool"),
                                    options.pop("decimals"), "--backbone")  # a stock BitNet checkpoint folder
    with guard(debug):
        import numpy as np

        from bitrl_compile.trainers import ppo

        backbone = options["backbone"]
        if backbone and not Path(backbone).exists():
            raise FileNotFoundError(f"{backbone}: no such backbone; give a policy file, a BitNet backbone folder "
                                    "or a features .bitrl")
        overrides = {"seed": seed, "heads_bits": float(heads_bits), "progress": not no_progress,
                     "out": out or f"runs/{env_id}-seed{seed}"}
        overrides.update({name: value for name, value in options.items() if value is not None})
        if steps:
            overrides["total_timesteps"] = steps
        if hidden:
            overrides["hidden"] = hidden
        check_env(env_id)
        with removed_if_failed(overrides["out"]):
            if bitnet_encoder:  # OUT/backbone: the encoder, referring to the checkpoint (compile it the same way)
                overrides["backbone"] = stock_backbone_folder(backbone, env_id, bitnet_encoder, overrides["out"])
            result = ppo.train(ppo.args_for(env_id, **overrides), log=lambda s: click.echo(s, err=True))
        click.echo(f"{env_id}: deterministic return {np.mean(result.eval_returns):.1f} ± "
                   f"{np.std(result.eval_returns):.1f} over {len(result.eval_returns)} episodes after "
                   f"{result.global_step} steps")
        click.echo(f"  {result.out}/policy.safetensors  (compile: bitrl-compile {result.out}/policy.safetensors)")
        click.echo(f"  {result.out}/learning_curve.png, progress.csv, checkpoint.safetensors")


@click.command("finetune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--env", "env_id", required=True, help="the gymnasium environment the policy was trained on")
@click.option("--method", type=click.Choice(["auto", "distill", "ppo"]), default="auto", show_default=True,
              help="distill: the fp32 policy teaches its ternary version (keeps the algorithm: a DQN stays a "
                   "Q-network, a TD3/SAC actor stays that actor); ppo: PPO fine-tune with a KL term (actor-critic "
                   "policies); auto: distill")
@click.option("--steps", type=click.IntRange(min=1),
              help="environment steps: ppo's QAT steps [default: a quarter of the env's preset]; distill's rollout "
                   "states at most [default: until --agreement or --budget]")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=180.0, show_default=True,
              help="distill: seconds of one core at most")
@click.option("--agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="distill: stop when the ternary policy acts like the fp32 one on this fraction of held-out states")
@click.option("--per-channel", is_flag=True,
              help="distill for one weight scale per output channel (then compile with --per-channel)")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="fine-tuned policy [default: MODEL stem + -ternary.safetensors]")
@click.option("--out", type=click.Path(file_okay=False), help="run folder for logs [default: runs/finetune-ENV]")
@click.option("--episodes", default=20, show_default=True, type=click.IntRange(min=1),
              help="evaluation episodes before and after")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--vecnormalize", type=click.Path(exists=True, dir_okay=False), help="observation statistics")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--force", is_flag=True, help="overwrite the output file")
@click.option("--no-progress", is_flag=True)
@click.option("--debug", is_flag=True)
def finetune_cmd(model, env_id, method, steps, budget, agreement, per_channel, output, out, episodes, seed, config,
                 vecnormalize, trust_pickle, force, no_progress, debug):
    """Quantization-aware fine-tune of an fp32 MLP policy so that its ternary version keeps the return: by
    distillation from the fp32 policy (any MLP policy: PPO, A2C, DQN, SAC, TD3) or by PPO (actor-critic)."""
    with guard(debug):
        import numpy as np

        from bitrl_compile.evaluate import evaluate
        from bitrl_compile.frontends import MLPPolicy, load_policy
        from bitrl_compile.runtime.files import check_output, write_atomic
        from bitrl_compile.trainers import ppo
        from bitrl_compile.trainers.export import check_policy_fits, reference_act

        was_given = output is not None
        output = Path(output) if output else Path(model).with_name(Path(model).stem + "-ternary.safetensors")
        check_output(output, force=force, inputs=[p for p in (model, config, vecnormalize) if p])  # before training
        check_env(env_id)
        cfg = json.loads(Path(config).read_text()) if config else None

        def load():
            return load_policy(model, config=cfg, trust_pickle=trust_pickle, vecnormalize=vecnormalize)

        def mean(act):
            returns, _ = evaluate(act, env_id, episodes, 10_000)
            return f"{np.mean(returns):.1f} ± {np.std(returns):.1f}"

        before = load()
        if before.input.get("recurrent"):  # one line: no file holds a recurrent student; --keep distils in memory
            from bitrl_compile.trainers.distill import check_distillable

            check_distillable(before, env_id, model)
        check_policy_fits(before, env_id, model, convolutional=method != "ppo")
        if not isinstance(before.module, MLPPolicy) and output.suffix != ".pt2":  # a CNN: distill writes a program
            if was_given:
                raise ValueError(f"{output}: a convolutional policy's student is a torch.export program; give "
                                 "--output ending in .pt2")
            output = output.with_suffix(".pt2")
            check_output(output, force=force, inputs=[p for p in (model, config, vecnormalize) if p])
        click.echo(f"before: fp32 {mean(reference_act(before, ternary=False))}, ternary (PTQ) "
                   f"{mean(reference_act(before, per_channel=per_channel))}  ({episodes} episodes)")
        if method in ("auto", "distill"):
            from bitrl_compile.trainers import distill

            run_out = out or f"runs/finetune-{env_id}-seed{seed}"
            args = distill.DistillArgs(seed=seed, budget_s=budget, agreement=agreement, per_channel=per_channel,
                                       out=run_out)
            if steps:
                args.max_rounds = -(-steps // (args.num_envs * args.steps_per_round))
            with removed_if_failed(run_out):
                result = distill.distill(before, env_id, output, args, log=lambda s: click.echo(s, err=True))
            flag = " --per-channel" if per_channel else ""
            program = {"env": env_id} if output.suffix == ".pt2" else None  # a program's actions come from --env
            flag += f" --env {env_id}" if program else ""
            click.echo(f"after distillation ({result.rounds} rounds, {result.seconds:.0f} s, held-out agreement "
                       f"{100 * result.agreement_before:.1f} % -> {100 * result.agreement_after:.1f} %): ternary "
                       f"{mean(reference_act(load_policy(output, config=program), per_channel=per_channel))}")
            if result.agreement_after < agreement:
                hint = (" or `--method ppo` (RL fine-tuning)" if result.kind == "logits" or
                        before.output.get("log_std") is not None else "")
                click.echo(f"bitrl-compile: warning: distillation reached {100 * result.agreement_after:.1f} % "
                           f"agreement, below the {100 * agreement:.1f} % target; give it a larger --budget{hint}",
                           err=True)
            click.echo(f"  {output}  (compile: bitrl-compile {output}{flag})")
            return
        overrides = {"seed": seed, "progress": not no_progress, "eval_episodes": episodes,
                     "out": out or f"runs/finetune-{env_id}-seed{seed}"}
        if steps:
            overrides["total_timesteps"] = steps
        with removed_if_failed(overrides["out"]):
            result = ppo.train(ppo.finetune_args(env_id, str(model), **overrides),
                               log=lambda s: click.echo(s, err=True), init_loaded=before)
        write_atomic(output, (result.out / "policy.safetensors").read_bytes())  # whole or not at all
        click.echo(f"after {result.global_step} QAT steps: ternary {mean(reference_act(load_policy(output)))}")
        click.echo(f"  {output}  (compile: bitrl-compile {output})")


@click.command("pretrain-bitnet")
@click.option("--env-id", "--env", "env_id", help="gymnasium environment id with Discrete actions")
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--steps", type=click.IntRange(min=1), help="transitions collected")
@click.option("--num-envs", type=click.IntRange(min=1), help="parallel environments")
@click.option("--teacher", type=click.Path(dir_okay=False),
              help="a policy file whose deterministic actions (with probability 1 - epsilon) drive the rollouts "
                   "[default: random actions]")
@click.option("--epsilon", type=click.FloatRange(0, 1), help="probability of a random action when there is a teacher")
@click.option("--hidden-size", type=click.IntRange(min=1), help="BitNet width d")
@click.option("--intermediate-size", type=click.IntRange(min=1), help="BitNet FFN width")
@click.option("--num-hidden-layers", type=click.IntRange(min=1))
@click.option("--num-attention-heads", type=click.IntRange(min=1))
@click.option("--num-key-value-heads", type=click.IntRange(min=1))
@click.option("--encoder", type=click.Choice(["numeric", "text"]),
              help="numeric: a token per observation value; text: the state as text, a token per byte")
@click.option("--patch", type=click.IntRange(min=1), help="numeric encoder: values per token")
@click.option("--decimals", type=click.IntRange(min=0), help="text encoder: digits after the point")
@click.option("--updates", type=click.IntRange(min=1), help="optimizer steps")
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True))
@click.option("--weight-decay", type=click.FloatRange(min=0))
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="fraction of transitions kept for the held-out losses")
@click.option("--out", type=click.Path(file_okay=False), help="backbone folder to write [default: write nothing]")
@click.option("--torch-threads", type=click.IntRange(min=1))
@click.option("--debug", is_flag=True)
def pretrain_bitnet_cmd(debug, **options):
    """Pretrain a small BitNet b1.58 state encoder on rollouts, self-supervised (trainers/pretrain_bitnet.py), for
    `bitrl-compile train --backbone OUT`. An option not given keeps its default in `pretrain_bitnet.Args` (the
    architecture's: `bitnet.BitNetConfig`'s)."""
    with guard(debug):
        import dataclasses

        from bitrl_compile.bitnet import BitNetConfig
        from bitrl_compile.trainers.pretrain_bitnet import Args, pretrain

        given = {name: value for name, value in options.items() if value is not None}
        architecture = {f.name: given.pop(f.name) for f in dataclasses.fields(BitNetConfig) if f.name in given}
        if "env_id" in given:
            check_env(given["env_id"])
        with removed_if_failed(*[given["out"]] if "out" in given else []):
            pretrain(Args(**given, model=BitNetConfig(**architecture)), log=lambda s: click.echo(s, err=True))

