"""Errors a user can act on, each with its documented exit code (docs/cli.md).

The CLI prints `tsopsd: error: <message>` on stderr and exits with `exit_code`; any other exception is a bug and
exits 1 (with the traceback only when TSOPSD_DEBUG=1).

Failures from outside this tool have codes of their own, so that exit 1 stays a bug: the user's code (a reward
function) raising or breaking its contract is exit 7 (UserCodeError); the machine refusing the run — a full disk,
a quota, a read-only or unwritable folder, an input gone mid-run, a rollout engine that cannot start — is exit 8
(EnvironmentFailure). A filesystem refusal is recognised by its errno where the I/O happens (`storage`), never
by the text of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error (a bug) or a failed run
EXIT_USAGE = 2  # bad input: flags, recipe, checkpoint, data, existing --out
EXIT_NONFINITE = 3  # training stopped on a non-finite loss or gradient; last good checkpoint kept
EXIT_MISSING_DEPENDENCY = 4  # an optional extra (vllm, matplotlib, trl, ...) was asked for and is not installed
EXIT_WEIGHT_SYNC = 5  # the rollout engine's log-probs left the trainer's (weight sync failed); last good one kept
EXIT_PEER = 6  # several processes: another process of the job died or stopped answering; the last checkpoint is kept
EXIT_USER_CODE = 7  # the user's own code (grpo.reward) raised or broke its contract; the run is kept resumable
EXIT_ENVIRONMENT = 8  # the machine refused: disk full, quota, read-only or unwritable folder, an input gone, no engine
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


class UserCodeError(TsopsdError):
    """The user's code (a reward function) raised, or returned what it must not (wrong length, not numbers,
    NaN or infinite values)."""

    exit_code = EXIT_USER_CODE


class EnvironmentFailure(TsopsdError):
    """The machine under the run refused it: its filesystem (full, over quota, read-only, permission denied, an
    input removed mid-run) or the rollout engine's start."""

    exit_code = EXIT_ENVIRONMENT


# A filesystem's refusals: what each errno means for the user (the rest of OSError stays a bug or bad input).
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the filesystem or the process's file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (permissions, or an immutable folder)",
    errno.EIO: "input/output error of the device",
}


def os_error_of(exc: BaseException | None) -> OSError | None:
    """The OSError (with an errno) that `exc` is or wraps: itself, its cause or context, or a rank's failure held
    by torch.distributed.checkpoint's CheckpointException (`failures`: {rank: (exception, traceback)})."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__context__, e.__cause__]
    return None


def storage_refusal(exc: BaseException) -> str | None:
    """What the filesystem refused, when `exc` is (or wraps) one of its refusals (STORAGE_ERRNOS); else None."""
    os_err = os_error_of(exc)
    if os_err is None or os_err.errno not in STORAGE_ERRNOS:
        return None
    where = f" ({os_err.filename})" if getattr(os_err, "filename", None) else ""
    return STORAGE_ERRNOS[os_err.errno] + where


@contextlib.contextmanager
def storage(doing: str, then: str) -> Iterator[None]:
    """Around I/O: a filesystem refusal inside becomes one EnvironmentFailure line, `<doing> failed (<why>);
    <then>` (what is kept and what to run next); anything else passes unchanged."""
    try:
        yield
    except TsopsdError:
        raise
    except BaseException as e:  # noqa: BLE001 - CheckpointException derives from BaseException
        why = None if isinstance(e, (KeyboardInterrupt, SystemExit)) else storage_refusal(e)
        if why is None:
            raise
        raise EnvironmentFailure(f"{doing} failed: {why}; {then}") from None


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
