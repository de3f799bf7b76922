"""The working directory of a resumable run: one mechanism for rl, reheat, eval and demo.

With `--out DIR` all work happens in the hidden sibling `.DIR.partial/`, guarded by the lock file `.DIR.lock`:

    .DIR.partial/state.json            the run key (recipe + input fingerprints: what a resume must match) and
                                       "complete" once every output is written
    .DIR.partial/<log>.jsonl           one JSON object per line: the metrics of a training run, the samples of an eval
    .DIR.partial/checkpoints/step-N/   a training run's resumable state, each written atomically

`finish()` marks the state complete and renames the directory to DIR in one step, so DIR only ever appears
complete; the state file goes only once DIR is in place. A run stopped after it was marked complete — a signal,
or a rename the filesystem refused (exit 8) — only needs that rename, which resuming does.

Resuming: `resume=True` (`--resume`) continues an unfinished run and refuses when there is none; `resume=False`
refuses an existing partial directory unless `restart` (`--restart`) discards it; `resume=None` continues a
matching partial directory by itself (eval: rerun the same command). A partial directory whose key differs is
never continued. Every refusal happens before anything is created, and `close(discard=True)` removes a partial
directory that this process created, so a refused or failed setup leaves nothing behind.

Several processes: the main process creates, locks and renames; the others only wait (the directory must be on a
filesystem all of them see).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from tsopsd_cli.errors import OutputExistsError, UsageError, exit_code_of, storage, with_code

STATE_FILE = "state.json"


def run_key(recipe, *inputs: str) -> str:
    """What must match for an unfinished run to be resumed: the recipe less its output settings (`--overwrite` on
    the first try and `--resume` on the next is the usual sequence) and the fingerprints of its inputs."""
    body = {k: v for k, v in recipe.model_dump(mode="json").items() if k != "output"}
    return hashlib.sha256(json.dumps([body, *inputs], sort_keys=True).encode()).hexdigest()[:16]


def partial_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


# --------------------------------------------------------------------------------------------------------- lock
class Lock:
    """An exclusive advisory lock on an output (`.NAME.lock` beside it) for as long as it is held: two runs writing
    the same --out (a job submitted twice) would corrupt each other, so the second one stops at once (exit 2)."""

    def __init__(self, out: Path):
        self.path = lock_path(out)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise UsageError(f"{out}: another tsopsd run is writing it ({holder})") from None
            # The holder before us may have unlinked the file between our open and our flock: then we hold a lock
            # on a file nobody else can see, so start again on the current one.
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still holding it (see the inode check above)
            except OSError:
                pass  # a folder that became unwritable: the file stays, unlocked (the next run locks it again)
            self._fh.close()
            self._fh = None


# ---------------------------------------------------------------------------------------------------------- log
class JsonlLog:
    """An append-only JSON-lines file whose torn last line (a kill during a write) is ignored and cut off."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: it and everything after are dropped
                if not line.endswith("\n") or not isinstance(row, dict):
                    break
                rows.append(row)
        return rows

    def keep(self, pred: Callable[[dict], bool] = lambda row: True) -> list[dict]:
        """Rewrite the file (atomically) with the valid rows that satisfy `pred`; returns them."""
        rows = [r for r in self.rows() if pred(r)]
        tmp = self.path.parent / f".{self.path.name}.tmp"
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.path)
        return rows

    def append(self, rows: list[dict], durable: bool = False) -> None:
        with open(self.path, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------------ run dir
class _Single:
    main = True

    def barrier(self) -> None:
        pass


class RunDir:
    def __init__(self, out: Path, *, key: str, log_name: str, resume: bool | None, restart: bool = False,
                 dist=None, what: str = "run", overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.path = partial_path(self.out)
        self.key = key
        self.dist = dist or _Single()
        self.log = JsonlLog(self.path / log_name)
        self.fresh = False  # this process created the partial directory
        self.resumed = False  # an unfinished run was found and is continued
        self.complete = False  # ...and it had already written every output
        self.lock: Lock | None = None
        self.keep = False  # set once the run has state worth keeping: a failure then leaves the partial directory
        self.nonce = uuid.uuid4().hex
        # what continues this run: eval (resume=None) continues by itself, a training run with --resume
        self.again = "run the same command again" if resume is None else "run the same command with --resume"
        outcome: dict = {}
        if self.dist.main:
            try:
                with storage(f"creating the run directory {self.path}", "nothing was created"):
                    self._open(resume, restart, what)
            except Exception as e:  # noqa: BLE001 - told to the other processes, then raised here
                outcome = {"error": str(e), "code": exit_code_of(e), "exc": e}
            outcome.update(resumed=self.resumed, complete=self.complete, nonce=self.nonce)
        try:
            shared = self._broadcast({k: v for k, v in outcome.items() if k != "exc"})
            if "exc" in outcome:
                raise outcome["exc"]
            if shared.get("error"):  # another process's refusal: stop too (only the main process reports it)
                raise with_code(shared["error"], shared["code"])
            self.resumed, self.complete = shared["resumed"], shared["complete"]
            self._same_directory(shared["nonce"])
        except BaseException:
            self.close(discard=True)  # nothing half-made stays behind (a .partial, a .lock)
            raise
        on_abort = getattr(self.dist, "on_abort", None)
        if on_abort is not None:  # a process ended by its watchdog (peers failed) cleans up too
            on_abort(lambda: self.close(discard=not self.keep))

    def _same_directory(self, nonce: str) -> None:
        """Several processes: every one must see the directory rank 0 made (a filesystem all of them share), or
        checkpoints would be incomplete and a resume would deadlock; refused on every rank (exit 2) otherwise."""
        agree = getattr(self.dist, "agree", None)
        if agree is None:
            return
        error = None
        if not self.dist.main and read_json(self.path / STATE_FILE).get("nonce") != nonce:
            error = UsageError(f"{self.path}: this process does not see the run directory that rank 0 made; "
                               "--out must be on a filesystem every process of the job shares")
        agree(error)

    def _broadcast(self, obj: dict) -> dict:
        fn = getattr(self.dist, "broadcast_object", None)
        return fn(obj) if fn is not None else obj

    def _open(self, resume: bool | None, restart: bool, what: str) -> None:
        exists = self.path.exists()
        if resume is True and not exists and not restart:
            raise UsageError(f"--resume: no unfinished {what} at {self.path}")
        from tsopsd_cli import signals

        signals.fault_point("lock")
        self.lock = Lock(self.out)
        try:
            # Checked again under the lock: a run that finished between the caller's check_out and this lock (a job
            # submitted twice) has put its output there, and nothing may replace it unless asked.
            self._refuse_existing()
            exists = self.path.exists()
            if resume is True and not exists and not restart:
                raise UsageError(f"--resume: no unfinished {what} at {self.path}")
            if exists and restart:
                shutil.rmtree(self.path)
                exists = False
            if exists:
                state = read_json(self.path / STATE_FILE)
                if resume is False:
                    raise OutputExistsError(f"{self.path}: an unfinished {what} is there (pass --resume to "
                                            "continue it, or --restart to discard it)")
                if state.get("key") != self.key:
                    raise UsageError(f"{self.path}: the unfinished {what} there used a different recipe or input; "
                                     "a resume needs the same ones (or pass --restart to discard it)")
                self.resumed = True
                self.complete = bool(state.get("complete"))
                write_json_atomic(self.path / STATE_FILE, {**state, "nonce": self.nonce})
            else:
                self.path.mkdir(parents=True)
                self.fresh = True
                write_json_atomic(self.path / STATE_FILE, {"key": self.key, "complete": False, "nonce": self.nonce})
        except BaseException:
            self.lock.release()
            raise

    def _refuse_existing(self) -> None:
        if self.out.exists() and not self.overwrite:
            raise OutputExistsError(f"{self.out}: already exists (pass --overwrite to replace it)")

    # ---------------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (a checkpoint directory only gets its step-N name once complete)."""
        d = self.checkpoint_root
        return sorted(p for p in d.glob("step-*") if p.is_dir()) if d.is_dir() else []

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def staging(self, step: int) -> Path:
        """The directory a checkpoint of `step` is written into before `publish` names it (every rank writes)."""
        return self.checkpoint_root / f".step-{step:06d}.tmp"

    def prepare_staging(self, step: int) -> Path:
        tmp = self.staging(step)
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        return tmp

    def publish(self, step: int, keep: int) -> Path:
        """Name the staged checkpoint step-N (atomic rename), then drop all but the newest `keep` ones."""
        target = self.checkpoint_root / f"step-{step:06d}"
        self.dist.barrier()
        if self.dist.main:
            if target.exists():
                self._discard(target)
            self.staging(step).rename(target)
            for old in self.checkpoints()[:-keep]:
                self._discard(old)
        self.dist.barrier()
        return target

    def _discard(self, path: Path) -> None:
        trash = path.parent / f".trash-{uuid.uuid4().hex[:8]}"
        path.rename(trash)  # out of the step-* namespace first: a kill during the rmtree leaves no half checkpoint
        shutil.rmtree(trash, ignore_errors=True)

    # --------------------------------------------------------------------------------------------------- finish
    def mark_complete(self) -> None:
        if self.dist.main:
            write_json_atomic(self.path / STATE_FILE, {"key": self.key, "complete": True, "nonce": self.nonce})
        self.complete = True

    def finish(self, before_rename: Callable[[], None] | None = None) -> Path:
        """Mark complete (every output is in place), then rename to --out, replacing an existing --out only with
        `overwrite` (otherwise refused: the complete run stays in the partial directory). `before_rename` runs
        between the two: a signal checked there leaves a complete, resumable directory. The state file, which
        says the run is complete and whose key a resume checks, is removed only once --out is in place: a rename
        the filesystem refuses (exit 8) leaves a complete run that the same command moves into place."""
        self.mark_complete()
        if before_rename is not None:
            before_rename()
        if self.dist.main:
            from tsopsd_cli.checkpoint import move_into_place

            self._refuse_existing()  # still holding the lock: only something outside tsopsd can have made it
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)  # complete: only the rename is left to do
            with storage(f"moving the finished run to {self.out}",
                         f"it is complete in {self.path}: make {self.out.parent} writable (or free space), then "
                         f"{self.again} to move it into place"):
                move_into_place(self.path, self.out)
            try:
                (self.out / STATE_FILE).unlink(missing_ok=True)
            except OSError:
                pass  # (a finished output with its state file is still complete)
        self.dist.barrier()
        return self.out

    def close(self, discard: bool = False) -> None:
        """Release the lock; with `discard`, also remove the partial directory if this process created it."""
        if self.dist.main:
            if discard and self.fresh and self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
            if self.lock is not None:
                self.lock.release()
