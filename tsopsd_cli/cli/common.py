"""What every command shares: recipe resolution from flags, output modes, progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tsopsd_cli.progress import Progress
from tsopsd_cli.recipe_loading import build_recipe, parse_set_options
from tsopsd_cli.report import json_safe

def one_of(names, default: str) -> str:
    """`names` as a help text's choice, the default marked: 'a (default), b or c'."""
    words = [f"{n} (default)" if n == default else n for n in names]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Recipe YAML file.",
                                                   rich_help_panel="Recipe")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override any recipe field: section.field=value (repeatable).", rich_help_panel="Recipe")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout (no progress bars; "
                                       "progress lines still go to a non-terminal stderr).", rich_help_panel="Output")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (bars or log lines).",
                                        rich_help_panel="Output")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (written atomically).",
                                                rich_help_panel="Output")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.",
                                            rich_help_panel="Output")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N.",
                                                  rich_help_panel="Model")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto, float32, bfloat16, float16.",
                                                 rich_help_panel="Model")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle weights (can run code).",
                                         rich_help_panel="Model")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with the checkpoint.",
                                         rich_help_panel="Model")]
# Options every training command (rl, reheat) has
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the unfinished run of --out from its last "
                                         "checkpoint.", rich_help_panel="Output")]
RestartOpt = Annotated[bool, typer.Option("--restart", help="Discard an unfinished run of --out.",
                                          rich_help_panel="Output")]
TrainOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory.",
                                           rich_help_panel="Output")]
DataOpt = Annotated[Optional[str], typer.Option(help="Prompts: 'toy' or a JSONL file (fields problem, answer). "
                                                "Required for a checkpoint that is not a toy-world one.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option(help="Training steps.")]
LrOpt = Annotated[Optional[float], typer.Option(help="Learning rate.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed of data order and sampling.")]


def resolve(command: str, recipe_file: Path | None, sets: list[str] | None, flags: dict[str, Any],
            checkpoint: str | None = None):
    """Recipe from defaults < file < typed flags < --set. Flags left at None/False are not applied. With
    `checkpoint`, the defaults are those of its world (recipe_loading.build_recipe: toy or real)."""
    overrides = [(k, v) for k, v in flags.items() if v is not None and v is not False]
    overrides += parse_set_options(sets or [])
    world = None
    if checkpoint is not None:
        from tsopsd_cli.tasks.toy import is_toy_checkpoint

        toy = is_toy_checkpoint(checkpoint)
        world = None if toy is None else ("toy" if toy else "real")
    return build_recipe(command, recipe_file, overrides, world=world)


ChatOpt = Annotated[bool, typer.Option("--chat-template", help="Wrap each prompt as one user turn of the "
                                       "tokenizer's chat template (instruct models).")]
TemplateOpt = Annotated[Optional[str], typer.Option(help="Prompt template: boxed (default), qa-boxed, plain, or "
                                                    "any text with {question} (used as written).")]


def prompt_flags(section: str, prompt_template: str | None, chat_template: bool) -> dict[str, Any]:
    """`--prompt-template` / `--chat-template` as overrides of `section` (data, validation or eval)."""
    return {f"{section}.prompt_template": prompt_template, f"{section}.chat_template": chat_template or None}


def model_flags(device, dtype, allow_pickle: bool, trust_remote_code: bool) -> dict[str, Any]:
    """The `model` section's typed flags, shared by every command that loads a checkpoint."""
    return {"model.device": device, "model.dtype": dtype, "model.allow_pickle": allow_pickle,
            "model.trust_remote_code": trust_remote_code}


def data_flags(data: str | None, split: str | None = None) -> dict[str, Any]:
    """`--data toy|FILE.jsonl` as `data.*` overrides (`split` for the toy source, when the command fixes one)."""
    if data is None:
        return {}
    if data == "toy":
        return {"data.type": "toy", **({"data.split": split} if split else {})}
    return {"data.type": "jsonl", "data.path": data}


def is_main_process() -> bool:
    """False in the non-main processes of a multi-process launch (only the main one reports)."""
    from tsopsd_cli import launch

    return launch.rank_text() == "0"


def progress_for(json_out: bool, quiet: bool) -> Progress:
    """Rich bars on a terminal (not with --json), plain lines at a steady pace when stderr is a file or pipe (a
    cluster log; also with --json), nothing with --quiet or in a non-main process. TSOPSD_PROGRESS=1: bars."""
    import os

    if quiet or not is_main_process():
        return Progress(mode="off")
    if os.environ.get("TSOPSD_PROGRESS") == "1":
        return Progress(mode="rich")
    if sys.stderr.isatty():
        return Progress(mode="off" if json_out else "rich")
    return Progress(mode="plain")


def emit(result: Any, json_out: bool, render) -> int:
    """A command's result on stdout: one JSON object with --json, else `render(result)` (a rich table). The work
    is done by now: a reader that went away (`| head -c 0`) does not make it a failure."""
    try:
        if json_out:
            print_json(result)
        else:
            render(result)
            sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    return 0


def print_json(obj: Any) -> None:
    try:
        sys.stdout.write(json.dumps(json_safe(obj), indent=None) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()


def _stdout_gone() -> None:
    """Nobody reads stdout any more: what is still buffered goes to /dev/null (no second error at exit)."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def stdout_console():
    """Rich console for results on stdout; off a terminal (logs, pipes) wide enough for the tables."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


EXAMPLE = "[bold]Example:[/bold] "


def training_prompt_flags(prompt_template: str | None, chat_template: bool) -> dict:
    """`--prompt-template` / `--chat-template` of rl and reheat: the training prompts and validation alike."""
    return {**prompt_flags("data", prompt_template, chat_template),
            **prompt_flags("validation", prompt_template, chat_template)}


def run_training(run_fn, rec, checkpoint: str, json_out: bool, quiet: bool, resume: bool,
                 restart: bool) -> dict | None:
    """Run rl or reheat; the report when it is this process's to print as a table, else None (another process
    than the main one, which reports nothing, or --json, printed here)."""
    main_process = is_main_process()
    report = run_fn(rec, checkpoint, progress_for(json_out, quiet), resume=resume, restart=restart)
    if not main_process:
        return None  # with several processes only the main one reports
    if json_out:
        print_json(report)
        return None
    return report
