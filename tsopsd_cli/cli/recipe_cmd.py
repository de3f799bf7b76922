"""`tsopsd recipe validate|show`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tsopsd_cli.cli.common import JsonOpt, print_json
from tsopsd_cli.errors import EXIT_USAGE, RecipeError
from tsopsd_cli.recipe import RECIPES
from tsopsd_cli.recipe_loading import defaults_yaml, validate_file

app = typer.Typer(help="Check recipe files and print defaults.", no_args_is_help=True,
                  epilog="[bold]Example:[/bold] tsopsd recipe show rl > my-rl.yaml && "
                         "tsopsd recipe validate my-rl.yaml")


@app.command("validate", epilog="[bold]Example:[/bold] tsopsd recipe validate recipes/*/*.yaml")
def validate(files: Annotated[list[Path], typer.Argument(help="Recipe files.")], json_out: JsonOpt = False) -> int:
    """Validate recipe files: one line per problem (file: field.path: message); exit 2 if any is invalid."""
    results = {str(f): validate_file(f) for f in files}
    if json_out:
        print_json({"valid": not any(results.values()), "files": results})
    else:
        for f, problems in results.items():
            if problems:
                for line in problems:
                    sys.stderr.write(f"tsopsd: error: {line}\n")
            else:
                sys.stdout.write(f"ok {f}\n")
    return EXIT_USAGE if any(results.values()) else 0


@app.command("show", epilog="[bold]Example:[/bold] tsopsd recipe show diagnose > my.yaml")
def show(command: Annotated[str, typer.Argument(help=f"One of: {', '.join(RECIPES)}.")]) -> int:
    """Print a command's default recipe as YAML."""
    if command not in RECIPES:
        raise RecipeError(f"unknown command {command!r}; choose from {', '.join(RECIPES)}")
    sys.stdout.write(defaults_yaml(command))
    return 0
