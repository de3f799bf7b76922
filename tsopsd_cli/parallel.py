"""Several processes and sharding, so that a runner asks for "the model, ready to train" and never needs to know
whether it is sharded.

Strategies (`train.strategy`; one process is always `single`):
- `ddp`: every process holds a full replica; gradients are summed across processes (bucketed all-reduce) before
  the optimiser step.
- `fsdp`: FSDP2 (`fully_shard`) on every decoder layer and on the root; every process holds 1/world of the
  weights, gradients and optimiser state. Gradients are reduce-scattered as sums (not means): losses are
  normalised by global token counts, so the update equals one process's with the same global batch.

Precision: training keeps float32 master weights and float32 optimiser state and computes in `model.dtype`:
with FSDP through `MixedPrecisionPolicy` (parameters gathered in model.dtype, gradients reduced in float32), on
one process or ddp through autocast. `train.master_weights: model_dtype` keeps the weights themselves in
model.dtype (pure low precision) — only when a recipe asks for it by name. Frozen models (teacher, reference) are
stored in model.dtype, sharded under fsdp unless `train.frozen: replicated`.

Under FSDP the model's own modules must run (their hooks gather and free parameters): `call()` runs a function
inside the root's forward, `layer_hook()` routes the lean forward's layers through the layer modules, and
`gathered()` keeps every parameter unsharded while decoding (no collective per token).
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch

from tsopsd_cli.devices import resolve_device, resolve_dtype
from tsopsd_cli.modeling import persistent_buffers


# ------------------------------------------------------------------------------------------------ processes
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
GRACE = 5.0
_KEY = "tsopsd/"
_ACTIVE: "Dist | None" = None


def env_int(name: str, default: int) -> int:
    """An integer from the launcher's environment (RANK, WORLD_SIZE, ...); a bad value is bad input (exit 2)."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        from tsopsd_cli.errors import UsageError

        raise UsageError(f"{name}={raw!r}: expected an integer (set by the launcher: torchrun, srun)") from None


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        from tsopsd_cli.errors import UsageError

        raise UsageError(f"{name}={raw!r}: expected a number of seconds > 0")
    return value


def _failure_record(store) -> dict | None:
    """The job's failure record {rank, code, message} on its store, or None while there is none."""
    return json.loads(store.get(_KEY + "abort")) if store.check([_KEY + "abort"]) else None


def announce_early_failure(code: int, message: str, wait: float = 15.0) -> None:
    """A process of a multi-process job that failed before it joined the others (a bad flag or recipe): post the
    failure on the job's store so that the others, waiting in the rendezvous, stop with the same code instead of
    waiting out the timeout. Rank 0 serves the store for up to `wait` seconds (until the others have read it)."""
    import time

    try:
        world, rank = env_int("WORLD_SIZE", 1), env_int("RANK", 0)
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), env_int("MASTER_PORT", 29500)
    except Exception:  # noqa: BLE001 - nothing to announce with
        return
    if world <= 1 or torch.distributed.is_initialized():
        return
    value = json.dumps({"rank": rank, "code": code, "message": message})
    import sys

    sys.stderr.flush()
    saved = os.dup(2)  # c10d logs connection retries with C++ stack traces on stderr: keep it to one line
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
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
        self.world, self.rank, self.local_rank = env_int("WORLD_SIZE", 1), env_int("RANK", 0), env_int("LOCAL_RANK", 0)
        self.failure: dict | None = None  # the job's first failure {rank, code, message}, once known
        self._watch: _Watchdog | None = None
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), env_int("MASTER_PORT", 29500)
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

        def connect():
            try:
                store = torch.distributed.TCPStore(host, port, self.world, self.rank == 0, timeout=timeout,
                                                   wait_for_workers=False)
                box["store"] = store
                torch.distributed.init_process_group(backend, store=store, rank=self.rank, world_size=self.world,
                                                     timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                box["error"] = e

        t = threading.Thread(target=connect, name="tsopsd-rendezvous", daemon=True)
        t.start()
        probe = None
        deadline = time.monotonic() + minutes * 60
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
    """See the comment above `Dist`: heartbeats, the failure record and signals, watched from a daemon thread."""

    def __init__(self, dist: Dist, host: str, port: int):
        import signal
        import threading

        self.dist = dist
        self.dead_after = _env_seconds("TSOPSD_PEER_TIMEOUT", PEER_DEAD)
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


# ------------------------------------------------------------------------------------------------ placement
@dataclass(frozen=True)
class Placement:
    """Where and in which precision a run's models live."""

    strategy: str  # single | ddp | fsdp
    device: torch.device
    master_dtype: torch.dtype  # trained weights and optimiser state
    compute_dtype: torch.dtype  # forward/backward arithmetic, frozen models
    frozen_sharded: bool
    world: int

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def autocast(self):
        """Compute in compute_dtype over master weights of another dtype (one process / ddp; FSDP casts itself)."""
        if self.fsdp or self.master_dtype == self.compute_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def describe(self) -> dict:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return {"strategy": self.strategy, "world_size": self.world, "device": str(self.device),
                "master_dtype": name(self.master_dtype), "compute_dtype": name(self.compute_dtype),
                "frozen": "sharded" if self.fsdp and self.frozen_sharded else "replicated"}


def placement(model_section, train_section, dist: Dist) -> Placement:
    device = resolve_device(dist.device(model_section.device))
    compute = resolve_dtype(model_section.dtype, device)
    master = compute if train_section.master_weights == "model_dtype" else torch.float32
    strategy = "single" if dist.world == 1 else train_section.strategy
    return Placement(strategy=strategy, device=device, master_dtype=master, compute_dtype=compute,
                     frozen_sharded=train_section.frozen == "sharded", world=dist.world)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The repeated transformer blocks (the unit FSDP shards one at a time)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if not isinstance(layers, torch.nn.ModuleList):
        from tsopsd_cli.errors import CheckpointError

        raise CheckpointError(f"{type(model).__name__}: cannot find its decoder layers to shard (train.strategy: "
                              "fsdp supports Llama-family layouts); use train.strategy: ddp")
    return layers


def _run(self, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def shards_from_rank0(pl: Placement, trainable: bool) -> bool:
    """Whether a model is loaded by the main process alone and sharded out to the others (`prepare`): every
    FSDP-sharded model of a run of several processes."""
    return pl.fsdp and pl.world > 1 and (trainable or pl.frozen_sharded)


def prepare(model, pl: Placement, trainable: bool):
    """The model on its device in its dtype, FSDP-wrapped where the placement says so; frozen models get
    requires_grad False and eval mode.

    A sharded model of several processes (`shards_from_rank0`) is loaded as verl and torchtune load one: only the
    main process has read the checkpoint (`model` holds its weights there and is a meta-device model, without
    storage, on the others); every process builds the same empty model, shards it, allocates only its own shards
    in the master dtype, and receives them from the main process one tensor at a time
    (`set_model_state_dict(..., broadcast_from_rank0=True)`). No process upcasts or holds the whole model in the
    master dtype: host memory per process is about one checkpoint-dtype copy on the main process plus 1/world of
    the master weights, instead of world x (checkpoint copy + full master copy)."""
    dtype = pl.master_dtype if trainable else pl.compute_dtype
    if shards_from_rank0(pl, trainable):
        return _shard_from_rank0(model, pl, trainable, dtype)
    model.to(device=pl.device, dtype=dtype)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    if pl.fsdp and (trainable or pl.frozen_sharded):
        _fully_shard(model, pl)
    return model


def _fully_shard(model, pl: Placement) -> None:
    """FSDP2 on every decoder layer, then the root (parameters gathered in the compute dtype, gradients reduced in
    float32 as sums)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=pl.compute_dtype, reduce_dtype=torch.float32)
    units = [*decoder_layers(model), model]
    for unit in units[:-1]:
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for unit in units:
        unit._tsopsd_run = types.MethodType(_run, unit)
        register_fsdp_forward_method(unit, "_tsopsd_run")
        unit.set_gradient_divide_factor(1.0)  # sum: losses are already normalised by global counts
        unit.set_force_sum_reduction_for_comms(True)  # (gloo has no pre-multiplied sum)


@torch.no_grad()
def _shard_from_rank0(model, pl: Placement, trainable: bool, dtype: torch.dtype):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    main = torch.distributed.get_rank() == 0
    full: dict = {}
    buffers: dict = {}
    if main:  # the loaded weights (checkpoint dtype, CPU) become the source; the model itself is rebuilt empty
        full = model.state_dict()
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        gen = model.generation_config
        with torch.device("meta"):  # (model.to("meta") would untie tied embeddings)
            model = type(model)(model.config)
        model.generation_config = gen
    model.to(dtype=dtype)  # meta: no memory
    model.eval()
    if not trainable:
        model.requires_grad_(False)
    _fully_shard(model, pl)
    model.to_empty(device=pl.device)  # this process's shards only, uninitialised
    # every tensor of the main process's state dict is broadcast, then each process keeps its slice
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    # buffers left out of the state dict (rotary inv_freq) were made on the meta device: the main process's values
    for name, buf in model.named_buffers():
        if main:
            buf.copy_(buffers[name].to(buf.dtype))
        torch.distributed.broadcast(buf, src=0)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def call(model, fn, *args, **kwargs):
    """fn(*args) inside the model's root forward: under FSDP its root parameters (embeddings, final norm, LM head)
    are gathered and stay so until the backward pass (FSDP keeps the root unsharded after forward)."""
    if is_sharded(model):
        return model._tsopsd_run(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def layer_hook(model):
    """For lean.shared_prefix_hidden: a hook that runs layer i's computation through the layer module (FSDP
    gathers its parameters before and frees them after, also when recomputed in the backward pass), or None."""
    if not is_sharded(model):
        return None
    layers = decoder_layers(model)
    return lambda i, fn, *args: layers[i]._tsopsd_run(fn, i, *args)


def _units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model) -> None:
    """Free the gathered root parameters of a frozen FSDP model (its forward keeps them: no backward follows)."""
    for unit in _units(model):
        unit.reshard()


@contextlib.contextmanager
def gathered(model) -> Iterator[None]:
    """Every parameter unsharded for the duration (decoding: no collective per token); a no-op unless sharded."""
    units = _units(model)
    if not units:
        yield
        return
    # FSDP initialises its states lazily from the root's first forward; unsharding a layer first would make the
    # root's later initialisation fail ("FSDP requires running forward through the root module first")
    model._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


# ----------------------------------------------------------------------------------------- gradients, norms
def sync_gradients(model, pl: Placement, bucket_elems: int = 1 << 25) -> None:
    """ddp: sum every trainable parameter's gradient over processes, in buckets (no buffer the size of all
    gradients). Every process must hold a gradient for every trainable parameter (the trainer fills zeros)."""
    if pl.strategy != "ddp":
        return
    params = [p for p in model.parameters() if p.requires_grad]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()

    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= bucket_elems:
            flush()
            size = 0
    flush()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


_SQ_SLICE = 1 << 20  # elements per float64 slice of a sum of squares (8 MiB)


def _sq_sum(t: torch.Tensor) -> float:
    """The sum of squares of a tensor, accumulated in float64 a slice at a time: no float64 copy of the whole
    tensor and of its square (2.5 GB for a 151,936 x 1,024 embedding or its gradient: the peak of a reheat step
    at Qwen3-0.6B's width, and 5x slower; docs/benchmarks.md). NaN or inf when any element is."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for i in range(0, flat.numel(), _SQ_SLICE):
        x = flat[i:i + _SQ_SLICE].double()
        total += torch.dot(x, x)
    return float(total)


def _global_sq_sum(tensors, pl: Placement, dist: Dist) -> float:
    local = sum(_sq_sum(_local(t)) for t in tensors)
    return dist.sum(local) if pl.fsdp else local


def clip_grad_norm(model, max_norm: float | None, pl: Placement, dist: Dist) -> float:
    """Global gradient L2 norm over all processes' shards; gradients are scaled down to `max_norm` when above."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = _global_sq_sum(grads, pl, dist) ** 0.5
    if max_norm is not None and norm == norm and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            _local(g).mul_(scale)
    return norm


def weight_norm(model, pl: Placement, dist: Dist) -> float:
    """Global L2 norm of the trained weights (NaN or inf when any weight is)."""
    return _global_sq_sum([p for p in model.parameters() if p.requires_grad], pl, dist) ** 0.5


# --------------------------------------------------------------------------------------------- full tensors
def full_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter (tied ones once) and persistent buffer, one at a time. Sharded
    parameters are all-gathered one by one: every process must consume the iterator in step."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
    yield from persistent_buffers(model)


def local_bytes(model, optimizer=None) -> dict:
    """Bytes this process holds of parameters, gradients and optimiser state (its shards under FSDP)."""
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size()
                for p in model.parameters() if p.grad is not None)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    opt += _local(v).numel() * _local(v).element_size()
    return {"parameter_bytes": params, "gradient_bytes": grads, "optimizer_state_bytes": opt}


# -------------------------------------------------------------------------------------- sharded checkpoints
def _quiet_single_process():
    """torch.distributed.checkpoint warns on stderr when it runs without a process group (one process): expected."""
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return ctx


def save_state(path, model, optimizer) -> None:
    """Model and optimiser state, each process writing its own shard (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    ctx = _quiet_single_process()
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    finally:
        ctx.__exit__(None, None, None)


def load_state(path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    ctx = _quiet_single_process()
    try:
        dcp.load(state, checkpoint_id=str(path))
    finally:
        ctx.__exit__(None, None, None)
    # the kernel choice (fused or foreach AdamW) belongs to this run's parameters, not to the checkpoint: a job
    # resumed on another number of processes has plain tensors where the writer had DTensors, or the reverse
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)


def save_model(path, model) -> None:
    """A (frozen) model's weights alone, sharded per process like save_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    ctx = _quiet_single_process()
    try:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(path))
    finally:
        ctx.__exit__(None, None, None)


def load_model(path, model) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    ctx = _quiet_single_process()
    try:
        dcp.load(state, checkpoint_id=str(path))
    finally:
        ctx.__exit__(None, None, None)
    set_model_state_dict(model, state["model"])


@torch.no_grad()
def copy_weights(dst, src) -> None:
    """dst's weights := src's (the same architecture; dst frozen, in its own dtype). Sharded into sharded copies
    each process's shards; into a replica, the full tensors are gathered one at a time."""
    for (name, d), (_, s) in zip(dst.named_parameters(), src.named_parameters(), strict=True):
        if hasattr(d, "to_local") and hasattr(s, "to_local"):
            d.to_local().copy_(s.to_local())
        else:
            d.copy_(s.full_tensor() if hasattr(s, "full_tensor") else s)
