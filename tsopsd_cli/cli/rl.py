"""`tsopsd rl CKPT --out DIR`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tsopsd_cli.cli.common import (ChatOpt, DataOpt, DeviceOpt, DtypeOpt, JsonOpt, LrOpt, MaxStepsOpt,
                                   OverwriteOpt, PickleOpt, QuietOpt, RecipeOpt, RemoteOpt, RestartOpt, ResumeOpt,
                                   SeedOpt, SetOpt, TemplateOpt, TrainOutOpt, data_flags, model_flags, resolve,
                                   run_training, stdout_console, training_prompt_flags)

EPILOG = ("[bold]Example:[/bold] tsopsd rl ./toy-base --recipe recipes/rl/toy.yaml --out ./toy-rl   "
          "(after pre-emption: the same command with --resume)")

def rl(
    checkpoint: Annotated[str, typer.Argument(help="Hugging Face checkpoint directory to continue from.")],
    out: TrainOutOpt, data: DataOpt = None, max_steps: MaxStepsOpt = None, lr: LrOpt = None,
    prompts_per_step: Annotated[Optional[int], typer.Option(help="Prompts (groups) per step.")] = None,
    num_generations: Annotated[Optional[int], typer.Option(help="Completions per prompt (group size).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Rollout temperature (> 1: rollout-level "
                                                                 "reheating).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest completion.")] = None,
    prompt_template: TemplateOpt = None, chat_template: ChatOpt = False,
    seed: SeedOpt = None, resume: ResumeOpt = False, restart: RestartOpt = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False, recipe: RecipeOpt = None, set_: SetOpt = None,
    overwrite: OverwriteOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """Continued GRPO with the DAPO-family options (clip-higher, token-mean loss, dynamic sampling, Clip-Cov,
    KL-Cov, ...). Writes a checkpoint with metrics.jsonl, report.json and curves; resumable.
    """
    flags = {
        "train.max_steps": max_steps, "optim.lr": lr, "train.prompts_per_step": prompts_per_step,
        "rollout.num_generations": num_generations, "rollout.temperature": temperature,
        "rollout.max_new_tokens": max_new_tokens, "train.seed": seed,
        **model_flags(device, dtype, allow_pickle, trust_remote_code),
        "output.out": str(out), "output.overwrite": overwrite,
    }
    flags.update(data_flags(data, split="train"))
    flags.update(training_prompt_flags(prompt_template, chat_template))
    rec = resolve("rl", recipe, set_, flags, checkpoint=checkpoint)
    from tsopsd_cli.runners.rl import run_rl

    report = run_training(run_rl, rec, checkpoint, json_out, quiet, resume, restart)
    if report is not None:
        render_training(report, "rl")
    return 0


def render_training(r: dict, name: str) -> None:
    con = stdout_console()
    e, v = r["entropy"], r["validation"]
    con.print(f"{name}: {r['steps']} steps in {r['seconds']:.0f} s -> {r['out']}")
    if e.get("first") is not None:
        con.print(f"  token entropy {e['first']:.4f} -> {e['last']:.4f} nats")
    if v.get("first") and v.get("last"):
        con.print(f"  validation accuracy {v['first']['val_accuracy']:.3f} -> {v['last']['val_accuracy']:.3f}, "
                  f"entropy {v['first']['val_entropy']:.4f} -> {v['last']['val_entropy']:.4f}")
