"""This process among the job's processes: joining them (rendezvous), small collectives (sums, objects, barriers)
and failing together, so that no process waits on one that has failed or gone.

One process is a group of one: every method then works on its own, without torch.distributed.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch

from tsopsd_cli import launch


# How a multi-process job keeps no rank waiting (issue 24). Besides the process group, every process keeps a side
# channel on the job's TCP store (MASTER_ADDR:MASTER_PORT, served by rank 0) and a watchdog thread that
#  - posts a heartbeat every HEARTBEAT seconds and notices a peer whose heartbeat stopped for TSOPSD_PEER_TIMEOUT
#    seconds (killed, out of memory) or whose process group store is gone (rank 0 died); a peer killed while the
#    others are in a collective with it is usually noticed sooner, by the collective's own error (`explain`);
#  - reads the job's failure record: the first process that fails posts {rank, code, message} (first one wins);
#  - reads the signal numbers that the C-level handler writes to a wake-up pipe even while the main thread is
#    blocked inside a collective (Python runs its own handlers only between bytecodes);
# and, when the main thread does not end by itself within GRACE seconds of such an event (it is blocked in a
# collective no peer will join), runs the registered clean-ups, prints one line and ends the process with the
# agreed exit code (130 once a signal was received; a second signal ends it at once). The rendezvous itself runs in
# a helper thread so that a signal ends a process whose peers never started. torchelastic's agent does the same
# from outside (it watches the workers and stops all when one fails); under srun there is no agent, so the
# processes watch each other.
HEARTBEAT = 0.5
PEER_DEAD = 60.0  # default of TSOPSD_PEER_TIMEOUT: long enough for a process busy in a call that holds the GIL
# default of TSOPSD_RENDEZVOUS_TIMEOUT: how long a process waits to reach a working store at MASTER_ADDR:MASTER_PORT
# (rank 0 serves it; rank 0 starting minutes after the others is within it; a port held by another program is not)
STORE_REACH = 300.0
GRACE = 5.0
_KEY = "tsopsd/"
_ACTIVE: "Dist | None" = None


# set when this process found no working store at MASTER_ADDR:MASTER_PORT within TSOPSD_RENDEZVOUS_TIMEOUT: a port
# held by another program blocks a store client for its whole timeout, so there is no failure to announce there
_NO_STORE = False


def _failure_record(store) -> dict | None:
    """The job's failure record {rank, code, message} on its store, or None while there is none."""
    return json.loads(store.get(_KEY + "abort")) if store.check([_KEY + "abort"]) else None


def announce_early_failure(code: int, message: str, wait: float = 15.0) -> None:
    """A process of a multi-process job that failed before it joined the others (a bad flag or recipe): post the
    failure on the job's store so that the others, waiting in the rendezvous, stop with the same code instead of
    waiting out the timeout. Rank 0 serves the store for up to `wait` seconds (until the others have read it). The
    whole of it is bounded: a port held by another program, which accepts and never answers, would block the
    store's client for good (it runs in a daemon thread, left behind)."""
    import sys
    import threading
    import time

    try:
        world, rank = launch.world(), launch.rank()
        host, port = launch.rendezvous()
    except Exception:  # noqa: BLE001 - nothing to announce with
        return
    if world <= 1 or torch.distributed.is_initialized() or _NO_STORE:
        return
    value = json.dumps({"rank": rank, "code": code, "message": message})

    def post():
        try:
            store = torch.distributed.TCPStore(host, port, world, rank == 0, timeout=timedelta(seconds=5),
                                               wait_for_workers=False)
            store.compare_set(_KEY + "abort", "", value)
            store.set(f"{_KEY}left/{rank}", "1")
            if rank == 0:
                others = [f"{_KEY}left/{r}" for r in range(1, world)]
                t0 = time.monotonic()
                while time.monotonic() - t0 < wait and not store.check(others):
                    time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the others are not there (yet): they time out instead
            pass

    sys.stderr.flush()
    saved = os.dup(2)  # c10d logs connection retries with C++ stack traces on stderr: keep it to one line
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        t = threading.Thread(target=post, name="tsopsd-announce", daemon=True)
        t.start()
        t.join(wait + 10.0)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def active() -> "Dist | None":
    """The multi-process group of this process, if one was set up (the CLI asks it for the agreed exit code)."""
    return _ACTIVE


class Dist:
    """This process's place among several (torch.distributed, gloo on CPU / nccl on GPU), or a single process."""

    def __init__(self, timeout_minutes: float = 30.0):
        global _ACTIVE
        self.world, self.rank, self.local_rank = launch.world(), launch.rank(), launch.local_rank()
        self.failure: dict | None = None  # the job's first failure {rank, code, message}, once known
        self._watch: _Watchdog | None = None
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            host, port = launch.rendezvous()
            self._rendezvous(backend, host, port, timeout_minutes)
            self._watch = _Watchdog(self, host, port)
            _ACTIVE = self

    def _rendezvous(self, backend: str, host: str, port: int, minutes: float) -> None:
        """Join the process group in a helper thread; the main thread stays responsive to signals meanwhile and
        stops waiting when another process posts a failure."""
        import threading
        import time

        from tsopsd_cli import signals
        from tsopsd_cli.errors import Interrupted, PeerFailed, with_code

        timeout = timedelta(minutes=minutes)
        box: dict = {}

        reach = launch.env_seconds("TSOPSD_RENDEZVOUS_TIMEOUT", STORE_REACH)

        def connect():
            try:
                # (the client's connection attempt blocks this process, signals and the deadline check included,
                # for up to the store's timeout when the port answers but is no store: it gets `reach`, and the
                # store the rendezvous' own timeout once it is reached)
                first = timeout if self.rank == 0 else min(timeout, timedelta(seconds=reach))
                store = torch.distributed.TCPStore(host, port, self.world, self.rank == 0, timeout=first,
                                                   wait_for_workers=False)
                store.set_timeout(timeout)
                box["store"] = store
                torch.distributed.init_process_group(backend, store=store, rank=self.rank, world_size=self.world,
                                                     timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                box["error"] = e

        t = threading.Thread(target=connect, name="tsopsd-rendezvous", daemon=True)
        t.start()
        probe = None
        t0 = time.monotonic()
        deadline = t0 + minutes * 60
        while t.is_alive():
            t.join(0.2)
            if signals.requested() is not None:
                raise Interrupted(f"{signals.requested()} received while waiting for the other processes of the job "
                                  f"to start (rendezvous at {host}:{port})")
            if "store" in box and probe is None:
                probe = torch.distributed.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10))
            if probe is not None and (f := _failure_record(probe)) is not None:
                probe.set(f"{_KEY}left/{self.rank}", "1")
                self.failure = f
                raise with_code(f"rank {f['rank']} failed: {f['message']}", f["code"])
            if "store" not in box and time.monotonic() - t0 > reach:  # (the thread is left behind: a daemon)
                global _NO_STORE
                _NO_STORE = True  # nothing to announce a failure on: the others meet the same timeout
                raise PeerFailed(f"no working rendezvous store at {host}:{port} within {reach:g} s "
                                 "(TSOPSD_RENDEZVOUS_TIMEOUT): is MASTER_PORT used by another program, or did rank 0 "
                                 "not start?")
            if time.monotonic() > deadline:
                raise PeerFailed(f"the other processes of the job did not all start within {minutes:g} min "
                                 f"(rendezvous at {host}:{port})")
        if "error" in box:
            raise PeerFailed(f"cannot join the other processes (rendezvous at {host}:{port}): "
                             f"{str(box['error']).splitlines()[0]}")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        if self.world > 1 and torch.cuda.is_available() and requested in ("auto", "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def _comm_device(self):
        backend = torch.distributed.get_backend() if self.world > 1 else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def sum(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return float(t[0])

    def max(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t[0])

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def agree(self, error: BaseException | None) -> None:
        """A collective decision: every process passes its own error (or None); when any has one, every process
        raises: its own, or the lowest failing rank's message with that rank's exit code."""
        from tsopsd_cli.errors import exit_code_of, with_code

        if self.world == 1:
            if error is not None:
                raise error
            return
        mine = None if error is None else {"code": exit_code_of(error), "message": str(error)}
        for rank, f in enumerate(self.gather_objects(mine)):
            if f is not None:
                if error is not None:
                    raise error
                raise with_code(f"rank {rank}: {f['message']}", f["code"])

    def on_abort(self, fn) -> None:
        """Register a clean-up the watchdog runs before it ends a process stuck waiting for failed peers."""
        if self._watch is not None:
            self._watch.cleanups.append(fn)

    def failing(self, exc: BaseException) -> None:
        """This process is ending on `exc`: post it as the job's failure (unless another was first), so that the
        others stop within seconds and exit with the same code."""
        from tsopsd_cli.errors import exit_code_of

        if self._watch is not None:
            self._watch.post_failure(exit_code_of(exc), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def explain(self, exc: BaseException) -> BaseException:
        """What a communication error (a collective whose peer went away) means: the failure another process
        posted (its message and exit code), or the death of the peers whose heartbeats stopped (exit 6). Any other
        exception is returned as it is."""
        if self._watch is None or not _is_comm_error(exc):
            return exc
        from tsopsd_cli.errors import PeerFailed, with_code

        record, dead = self._watch.diagnose()
        if record is not None and record["rank"] != self.rank:
            return with_code(f"rank {record['rank']} failed: {record['message']}", record["code"])
        who = f"rank {', '.join(map(str, dead))}" if dead else "another process"
        return PeerFailed(f"{who} of the job died (a collective lost its peer); the last checkpoint is kept: "
                          "continue with the same command and --resume")

    def close(self) -> None:
        global _ACTIVE
        if self._watch is not None:
            self.failure = self._watch.leave()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _is_comm_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset", "gloo", "NCCL", "Broken pipe"))


class _Watchdog:
    """Heartbeats, the failure record and signals, watched from a daemon thread (the comment at the top of this
    module says how)."""

    def __init__(self, dist: Dist, host: str, port: int):
        import signal
        import threading

        self.dist = dist
        self.dead_after = launch.env_seconds("TSOPSD_PEER_TIMEOUT", PEER_DEAD)
        self.store = torch.distributed.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
        self.lock = threading.Lock()  # the store client is used by this thread and the main thread
        self.cleanups: list = []
        self.stopped = threading.Event()
        self.signals = 0
        self.rfd = self.wfd = None
        try:
            rfd, wfd = os.pipe()
            os.set_blocking(wfd, False)
            signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
            self.rfd, self.wfd = rfd, wfd
        except ValueError:  # not the main thread: no wake-up pipe (signals are then seen at safe points only)
            pass
        self.thread = threading.Thread(target=self._run, name="tsopsd-watchdog", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------- main thread
    def post_failure(self, code: int, message: str) -> None:
        value = json.dumps({"rank": self.dist.rank, "code": code, "message": message})
        try:
            with self.lock:
                self.store.compare_set(_KEY + "abort", "", value)
        except Exception:  # noqa: BLE001 - the store (rank 0) is gone: nobody is left to tell
            pass

    def failure(self) -> dict | None:
        try:
            with self.lock:
                record = _failure_record(self.store)
            if record is not None:
                return record
        except Exception:  # noqa: BLE001
            pass
        return self.dist.failure

    def diagnose(self, wait: float = 3.0) -> tuple[dict | None, list[int]]:
        """(the failure record, or None; the peers whose heartbeats did not advance during `wait` seconds)."""
        import time

        peers = [r for r in range(self.dist.world) if r != self.dist.rank]

        def read():
            with self.lock:
                return _failure_record(self.store), {r: self.store.add(f"{_KEY}hb/{r}", 0) for r in peers}

        try:
            record, first = read()
            t0 = time.monotonic()
            while record is None and time.monotonic() - t0 < wait:
                time.sleep(0.2)
                record, last = read()
            if record is not None:
                self.dist.failure = record
                return record, []
            return None, [r for r in peers if last[r] == first[r]]
        except Exception:  # noqa: BLE001 - the store is gone: rank 0 died
            return self.dist.failure, [0] if self.dist.failure is None else []

    def leave(self) -> dict | None:
        """Stop watching; say so to the others; rank 0 (the store's host) waits up to GRACE seconds for the others
        to leave, so that they can still read the failure record. Returns the job's failure record, if any."""
        import signal
        import time

        self.stopped.set()
        failure = self.failure()
        try:
            with self.lock:
                self.store.set(f"{_KEY}left/{self.dist.rank}", "1")
            if self.dist.main:
                others = [f"{_KEY}left/{r}" for r in range(1, self.dist.world)]
                t0 = time.monotonic()
                while time.monotonic() - t0 < GRACE:
                    with self.lock:
                        if self.store.check(others):
                            break
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001
            pass
        if self.wfd is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
        return failure

    # ---------------------------------------------------------------------------------------------- watchdog
    def _die(self, code: int, line: str) -> None:
        import sys

        for fn in self.cleanups:
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort: the process ends next
                pass
        try:
            with self.lock:
                self.store.set(f"{_KEY}left/{self.dist.rank}", "1")
        except Exception:  # noqa: BLE001
            pass
        sys.stderr.write(f"tsopsd: error: {line}\n")
        sys.stderr.flush()
        os._exit(code)

    def _run(self) -> None:
        import select
        import signal
        import time

        from tsopsd_cli.errors import EXIT_INTERRUPTED, EXIT_PEER

        me = self.dist.rank
        peers = [r for r in range(self.dist.world) if r != me]
        beats = {r: (-1, time.monotonic()) for r in peers}
        event: tuple[float, int, str] | None = None  # (when, exit code, line): the main thread should end soon
        while not self.stopped.is_set():
            if self.rfd is not None:
                ready = select.select([self.rfd], [], [], HEARTBEAT)[0]
                if ready:
                    got = os.read(self.rfd, 64)
                    self.signals += sum(1 for b in got if b in (signal.SIGTERM, signal.SIGINT))
            else:
                time.sleep(HEARTBEAT)
            if self.stopped.is_set():
                return
            now = time.monotonic()
            if self.signals >= 2:
                self._die(EXIT_INTERRUPTED, "a second signal: stopped at once (the last checkpoint stays valid; "
                                            "continue with the same command and --resume)")
            try:
                with self.lock:
                    self.store.add(f"{_KEY}hb/{me}", 1)
                    record = _failure_record(self.store)
                    gone = {r for r in peers if self.store.check([f"{_KEY}left/{r}"])}
                    counts = {r: self.store.add(f"{_KEY}hb/{r}", 0) for r in peers}
            except Exception:  # noqa: BLE001 - the store is served by rank 0: it is gone
                if event is None and self.dist.failure is None:
                    event = (now, EXIT_PEER, "rank 0 of the job died (its rendezvous store is gone); the last "
                                             "checkpoint is kept: continue with the same command and --resume")
                elif event is None:
                    f = self.dist.failure
                    event = (now, f["code"], f"rank {f['rank']} failed: {f['message']}")
            else:
                if record is not None:
                    self.dist.failure = record
                    if event is None and record["rank"] != me:
                        event = (now, record["code"], f"rank {record['rank']} failed: {record['message']}")
                for r in peers:
                    if counts[r] != beats[r][0]:
                        beats[r] = (counts[r], now)
                    elif r not in gone and now - beats[r][1] > self.dead_after and event is None:
                        msg = (f"rank {r} stopped answering for {self.dead_after:g} s (died?); the last checkpoint is "
                               "kept: continue with the same command and --resume")
                        self.post_failure(EXIT_PEER, msg)
                        event = (now, EXIT_PEER, msg)
            if event is not None and now - event[0] > GRACE:
                code = EXIT_INTERRUPTED if self.signals else event[1]
                self._die(code, event[2])


def shard(items: list, dist: Dist) -> list:
    """This process's share of a list (every world-th item)."""
    return items[dist.rank::dist.world]

