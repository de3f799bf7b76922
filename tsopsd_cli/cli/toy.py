"""`tsopsd toy ...`: the built-in toy world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd_cli.cli.common import (JsonOpt, OverwriteOpt, QuietOpt, RecipeOpt, SetOpt, print_json, progress_for,
                                   resolve, stdout_console)

app = typer.Typer(help="The built-in toy world: seeded multi-step arithmetic and a tiny Qwen3 model.",
                  epilog="[bold]Example:[/bold] tsopsd toy init --out ./toy-base", no_args_is_help=True)


@app.command("init", epilog="[bold]Example:[/bold] tsopsd toy init --out ./toy-base")
def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to create.")],
    steps: Annotated[Optional[int], typer.Option(help="SFT optimiser steps.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation and data.")] = None,
    recipe: RecipeOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> int:
    """Build the toy tokenizer and a tiny Qwen3 model, train it on worked solutions, save a checkpoint."""
    rec = resolve("toy-init", recipe, set_, {"output.out": str(out), "output.overwrite": overwrite,
                                             "train.steps": steps, "train.seed": seed})
    from tsopsd_cli.runners.toy_init import run_toy_init

    result = run_toy_init(rec, progress_for(json_out, quiet))
    if json_out:
        print_json(result)
    else:
        con = stdout_console()
        con.print(f"toy checkpoint written to {result['checkpoint']}")
        con.print(f"  parameters {result['parameters']:,}; SFT loss {result['final_loss']:.3f}; "
                  f"test accuracy greedy {result['test_accuracy_greedy']:.3f}, "
                  f"sampled {result['test_accuracy_sampled']:.3f}; "
                  f"sampled-token NLL {result['sampled_nll_per_token']:.3f} nats")
    return 0
