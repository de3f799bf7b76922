"""The `tsopsd` command line. Thin: parse flags into a recipe, call a runner, print the result.

`main(argv) -> int` maps every known error to one line on stderr and its exit code (docs/cli.md);
TSOPSD_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Optional

import typer

from tsopsd_cli import __version__
from tsopsd_cli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, TsopsdError

app = typer.Typer(
    name="tsopsd", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
    help="Diagnose, reheat (TS-OPSD), continue RL on and evaluate reasoning-LLM checkpoints.\n\n"
         "[bold]Example:[/bold] tsopsd toy init --out base && tsopsd diagnose base",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tsopsd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                           help="Print the version and exit.")] = None) -> None:
    pass


def _register() -> None:
    from tsopsd_cli.cli import demo, diagnose, evaluate, plan, recipe_cmd, reheat, rl, toy

    app.command("diagnose", epilog="[bold]Example:[/bold] tsopsd diagnose ./ckpt --reference ./base "
                "--num-prompts 32 --out diag/")(diagnose.diagnose)
    app.command("eval", epilog=evaluate.EVAL_EPILOG)(evaluate.evaluate)
    # `tsopsd eval grade FILE` is routed here by main(): `eval` itself takes a checkpoint argument.
    app.command("eval-grade", hidden=True, epilog="[bold]Example:[/bold] tsopsd eval grade samples.jsonl "
                "--json")(evaluate.grade)
    app.command("rl", epilog=rl.EPILOG)(rl.rl)
    app.command("reheat", epilog=reheat.EPILOG)(reheat.reheat)
    app.command("demo", epilog=demo.EPILOG)(demo.demo)
    app.command("plan", epilog=plan.EPILOG)(plan.plan)
    app.add_typer(toy.app, name="toy")
    app.add_typer(recipe_cmd.app, name="recipe")


_register()


try:  # recent typer vendors click; older typer uses click itself
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    import click.exceptions as _click_exc

_ClickException = _click_exc.ClickException
_Exit = tuple(c for c in (getattr(_click_exc, "Exit", None), getattr(_click_exc, "NoArgsIsHelpError", None)) if c)
_Abort = getattr(_click_exc, "Abort", KeyboardInterrupt)


def _error(lines: list[str]) -> None:
    for line in lines:
        sys.stderr.write(f"tsopsd: error: {line}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:2] == ["eval", "grade"]:
        args = ["eval-grade", *args[2:]]
    debug = os.environ.get("TSOPSD_DEBUG") == "1"
    from tsopsd_cli import signals

    try:
        with signals.installed():
            result = app(args=args, prog_name="tsopsd", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except TsopsdError as e:
        if debug:
            traceback.print_exc()
        _error(e.lines)
        return e.exit_code
    except _Exit as e:  # --help, --version, no arguments: help was printed
        return getattr(e, "exit_code", 0)
    except _Abort:
        _error(["interrupted"])
        return EXIT_INTERRUPTED
    except _ClickException as e:
        if debug:
            traceback.print_exc()
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _error([e.format_message().strip().replace("\n", " ") + hint])
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error(["interrupted"])
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - last resort: one line, traceback on request
        if debug:
            traceback.print_exc()
        _error([f"internal error: {type(e).__name__}: {e} (set TSOPSD_DEBUG=1 for the traceback)"])
        return EXIT_FAILURE


def entry() -> None:
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One process of a multi-process job: its outputs are written and closed and its process group destroyed.
        # Leave without interpreter finalisation, where the c10d/gloo backend and the device mesh FSDP's modules
        # hold are torn down after Python's own state and may abort ("terminate called without an active
        # exception", SIGABRT) — a finished run would then report a failed exit code to the launcher.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
