"""`tsopsd reheat CKPT --temp 1.6 --out DIR`."""

from __future__ import annotations

from typing import Annotated, Optional, get_args

import typer

from tsopsd_cli.cli.common import (ChatOpt, DataOpt, DeviceOpt, DtypeOpt, JsonOpt, LrOpt, MaxStepsOpt,
                                   OverwriteOpt, PickleOpt, QuietOpt, RecipeOpt, RemoteOpt, RestartOpt, ResumeOpt,
                                   SeedOpt, SetOpt, TemplateOpt, TrainOutOpt, data_flags, model_flags, resolve,
                                   one_of, run_training, stdout_console, training_prompt_flags)
from tsopsd_cli.recipe import ReheatSection

EPILOG = ("[bold]Example:[/bold] tsopsd reheat ./collapsed --temp 1.6 --out ./hot   "
          "(exact baseline: tsopsd reheat ./collapsed --method fold --temp 1.6 --out ./folded)")


def choices(field: str) -> str:
    """The choices of a `reheat` section field (a Literal), its default marked."""
    info = ReheatSection.model_fields[field]
    return one_of(get_args(info.annotation), info.default)


def reheat(
    checkpoint: Annotated[str, typer.Argument(help="Hugging Face checkpoint directory to reheat.")],
    out: TrainOutOpt,
    temp: Annotated[Optional[float], typer.Option(
        "--temp", help="Teacher temperature: the teacher is softmax(logits / temp) (default 1.6).")] = None,
    method: Annotated[Optional[str], typer.Option(help=f"{choices('method')}.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help=f"{choices('teacher')}.")] = None,
    divergence: Annotated[Optional[str], typer.Option(help=f"{choices('divergence')}.")] = None,
    data: DataOpt = None, max_steps: MaxStepsOpt = None, lr: LrOpt = None,
    target_entropy: Annotated[Optional[float], typer.Option(help="Stop at this student entropy (nats).")] = None,
    target_entropy_ratio: Annotated[Optional[float], typer.Option(help="Stop at this fraction of the teacher's "
                                                                        "entropy.")] = None,
    prompt_template: TemplateOpt = None, chat_template: ChatOpt = False,
    seed: SeedOpt = None, resume: ResumeOpt = False, restart: RestartOpt = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False, recipe: RecipeOpt = None, set_: SetOpt = None,
    overwrite: OverwriteOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """Reheat a collapsed checkpoint: TS-OPSD (on-policy self-distillation from the model's own logits / temp),
    or --method fold (exact closed form: final-norm weight / temp). Writes a checkpoint and a before/after report.
    """
    flags = {
        "reheat.temp": temp, "reheat.method": method, "reheat.teacher": teacher, "reheat.divergence": divergence,
        "reheat.target_entropy": target_entropy, "reheat.target_entropy_ratio": target_entropy_ratio,
        "train.max_steps": max_steps, "optim.lr": lr, "train.seed": seed,
        **model_flags(device, dtype, allow_pickle, trust_remote_code),
        "output.out": str(out), "output.overwrite": overwrite,
    }
    flags.update(data_flags(data, split="train"))
    flags.update(training_prompt_flags(prompt_template, chat_template))
    rec = resolve("reheat", recipe, set_, flags, checkpoint=checkpoint)
    from tsopsd_cli.runners.reheat import run_reheat

    report = run_training(run_reheat, rec, checkpoint, json_out, quiet, resume, restart)
    if report is None:
        return 0
    con = stdout_console()
    if report["method"] == "fold":
        con.print(f"folded 1/{report['temp']} into the final norm -> {report['out']} "
                  f"(max logit error {report['max_logit_error']:.2e}, {report['seconds']:.1f} s)")
        return 0
    b, a, acc = report["before"], report["after"], report["accuracy"]
    con.print(f"reheat (TS-OPSD, temp={report['temp']}): {report['steps']} steps in {report['seconds']:.0f} s, "
              f"stopped by {report['stop_reason']} -> {report['out']}")
    if b and a:
        at = report["entropy_at_temp"]
        con.print(f"  entropy {b['entropy']:.4f} -> {a['entropy']:.4f} nats (at temp {report['temp']:g}: "
                  f"{at['before']:.4f} -> {at['after']:.4f}); top-1 agreement with input {a['top1_agreement']:.3f}; "
                  f"Jaccard@10 {a['topk_jaccard']['10']:.3f}; CKA last layer {a['cka'][-1]:.3f}")
    if acc["before"] is not None:
        con.print(f"  validation accuracy {acc['before']:.3f} -> {acc['after']:.3f}")
    return 0
