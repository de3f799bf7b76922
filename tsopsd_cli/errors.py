"""Errors a user can act on, each with its documented exit code (docs/cli.md).

The CLI prints `tsopsd: error: <message>` on stderr and exits with `exit_code`; any other exception is a bug and
exits 1 (with the traceback only when TSOPSD_DEBUG=1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error (a bug) or a failed run
EXIT_USAGE = 2  # bad input: flags, recipe, checkpoint, data, existing --out
EXIT_NONFINITE = 3  # training stopped on a non-finite loss or gradient; last good checkpoint kept
EXIT_MISSING_DEPENDENCY = 4  # an optional extra (vllm, matplotlib, trl, ...) was asked for and is not installed
EXIT_WEIGHT_SYNC = 5  # the rollout engine's log-probs left the trainer's (weight sync failed); last good one kept
EXIT_PEER = 6  # several processes: another process of the job died or stopped answering; the last checkpoint is kept
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: a resumable checkpoint was saved first


class TsopsdError(Exception):
    """Base class: a message for the user and an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, lines: list[str] | None = None):
        super().__init__(message)
        self.lines = lines or [message]


class UsageError(TsopsdError):
    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """One line per problem, `field.path: message`."""


class CheckpointError(UsageError):
    pass


class DataError(UsageError):
    pass


class OutputExistsError(UsageError):
    pass


class MissingDependencyError(TsopsdError):
    exit_code = EXIT_MISSING_DEPENDENCY


class NonFiniteError(TsopsdError):
    exit_code = EXIT_NONFINITE


class WeightSyncError(TsopsdError):
    exit_code = EXIT_WEIGHT_SYNC


class Interrupted(TsopsdError):
    exit_code = EXIT_INTERRUPTED


class PeerFailed(TsopsdError):
    """Another process of a multi-process job died, stopped answering or never started."""

    exit_code = EXIT_PEER


def exit_code_of(exc: BaseException) -> int:
    """The exit code an exception ends a command with (docs/cli.md)."""
    if isinstance(exc, TsopsdError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


def with_code(message: str, code: int) -> TsopsdError:
    """A TsopsdError with the exit code of another process's error (every rank exits with the same code)."""
    err = TsopsdError(message)
    err.exit_code = code
    return err
