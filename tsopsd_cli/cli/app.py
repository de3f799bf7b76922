"""The `tsopsd` command line. Thin: parse flags into a recipe, call a runner, print the result.

`main(argv) -> int` maps every known error to one line on stderr and its exit code (docs/cli.md);
TSOPSD_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Annotated, Optional

import typer

from tsopsd_cli import __version__, launch
from tsopsd_cli.errors import (EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, TsopsdError,
                               storage_refusal)

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


class _Escaped(Exception):
    """A KeyboardInterrupt or broken pipe raised inside a command, carried past typer (which would turn them into
    exit 130 and exit 1 with nothing said) to main()."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


def _guarded(fn):
    """The command `fn` with KeyboardInterrupt and broken pipes kept away from typer (see _Escaped)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Escaped(e) from None
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise _Escaped(e) from None
            raise

    return run


def _register() -> None:
    from tsopsd_cli.cli import demo, diagnose, evaluate, plan, recipe_cmd, reheat, rl, toy

    app.command("diagnose", epilog="[bold]Example:[/bold] tsopsd diagnose ./ckpt --reference ./base "
                "--num-prompts 32 --out diag/")(_guarded(diagnose.diagnose))
    app.command("eval", epilog=evaluate.EVAL_EPILOG)(_guarded(evaluate.evaluate))
    # `tsopsd eval grade FILE` is routed here by main(): `eval` itself takes a checkpoint argument.
    app.command("eval-grade", hidden=True, epilog="[bold]Example:[/bold] tsopsd eval grade samples.jsonl "
                "--json")(_guarded(evaluate.grade))
    app.command("rl", epilog=rl.EPILOG)(_guarded(rl.rl))
    app.command("reheat", epilog=reheat.EPILOG)(_guarded(reheat.reheat))
    app.command("demo", epilog=demo.EPILOG)(_guarded(demo.demo))
    app.command("plan", epilog=plan.EPILOG)(_guarded(plan.plan))
    for sub in (toy.app, recipe_cmd.app):
        for info in sub.registered_commands:
            info.callback = _guarded(info.callback)
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


def _silence_stdout() -> None:
    """The reader of stdout went away (`| head`): send what is left to /dev/null, so that the final flush at exit
    does not fail again (Python's documented remedy for EPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _outcome(exc: BaseException, debug: bool) -> tuple[int, list[str]]:
    """(exit code, lines for stderr) of an exception that ended a command."""
    if isinstance(exc, _Escaped):
        exc = exc.exc
    if isinstance(exc, TsopsdError):
        if debug:
            traceback.print_exception(exc)
        return exc.exit_code, exc.lines
    if isinstance(exc, _Exit):  # --help, --version, no arguments: help was printed
        return getattr(exc, "exit_code", 0), []
    if isinstance(exc, (_Abort, KeyboardInterrupt)):
        return EXIT_INTERRUPTED, ["interrupted (a second signal stops at once; outputs are written atomically, "
                                  "nothing half-written is left visible)"]
    if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
        _silence_stdout()
        return EXIT_FAILURE, ["the output pipe was closed before the result was printed"]
    if isinstance(exc, _ClickException):
        if debug:
            traceback.print_exception(exc)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return EXIT_USAGE, [exc.format_message().strip().replace("\n", " ") + hint]
    if debug:
        traceback.print_exception(exc)
    refused = storage_refusal(exc)
    if refused is not None:  # a filesystem refusal that no command mapped where it happened: still not a bug
        return EXIT_ENVIRONMENT, [f"the filesystem refused: {refused}; free space or fix the permissions, then run "
                                  "the same command again (a training run: with --resume)"]
    if type(exc).__name__ == "CheckpointException":  # torch.distributed.checkpoint: a BaseException
        return EXIT_FAILURE, [f"reading or writing a sharded checkpoint failed: {_first_cause(exc)}"]
    return EXIT_FAILURE, [f"internal error: {type(exc).__name__}: {exc} (set TSOPSD_DEBUG=1 for the traceback)"]


def _first_cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _agreed(code: int, lines: list[str]) -> tuple[int, list[str]]:
    """Several processes: every rank exits with the code of the job's first failure (posted by the rank that
    failed first), not with the follow-on error a collective with a departed peer gives it. A process that failed
    before it joined the others tells them (they wait in the rendezvous)."""
    if code == 0 or launch.world_or_one() <= 1:
        return code, lines
    from tsopsd_cli.parallel import group

    dist = group.active()
    if dist is None and code != EXIT_INTERRUPTED:
        group.announce_early_failure(code, lines[0] if lines else "failed")
        return code, lines
    failure = dist.failure if dist is not None else None
    if failure is None or code == 0 or failure["rank"] == dist.rank or failure["code"] == code:
        return code, lines
    return failure["code"], [f"rank {failure['rank']} failed: {failure['message']}"]


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
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every error: one line, traceback on request
        code, lines = _agreed(*_outcome(e, debug))
        _error(lines)
        return code
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        if isinstance(e, SystemExit):
            raise
        code, lines = _agreed(*_outcome(e, debug))
        _error(lines)
        return code


def entry() -> None:
    code = main()
    if launch.world_or_one() > 1:
        # One process of a multi-process job: its outputs are written and closed and its process group destroyed.
        # Leave without interpreter finalisation, where the c10d/gloo backend and the device mesh FSDP's modules
        # hold are torn down after Python's own state and may abort ("terminate called without an active
        # exception", SIGABRT) — a finished run would then report a failed exit code to the launcher.
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        sys.stderr.flush()
        os._exit(code)
    try:
        sys.stdout.flush()
    except OSError:
        _silence_stdout()
    sys.exit(code)
