"""Where a run's models live and how they are split over the processes, so that a runner asks for "the model,
ready to train" and never needs to know whether it is sharded.

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
stored in model.dtype, sharded under fsdp unless `train.frozen: replicated`. A frozen model whose weights follow the
trained one's (the EMA teacher, `ema_update`) is kept in float32 and placed exactly like the trained model, so that
under fsdp each process averages its own shards.

Under FSDP the model's own modules must run (their hooks gather and free parameters): `call()` runs a function
inside the root's forward, `layer_hook()` routes the lean forward's layers through the layer modules, and
`gathered()` keeps every parameter unsharded while decoding (no collective per token).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Iterator

import torch

from tsopsd_cli.devices import resolve_device, resolve_dtype
from tsopsd_cli.modeling import persistent_buffers
from tsopsd_cli.parallel.group import Dist


# ---------------------------------------------------------------------------------------- placement, wrapping
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


def shards_from_rank0(pl: Placement, like_policy: bool) -> bool:
    """Whether a model is loaded by the main process alone and sharded out to the others (`prepare`): every
    FSDP-sharded model of a run of several processes (`like_policy`: the trained model, or one placed like it)."""
    return pl.fsdp and pl.world > 1 and (like_policy or pl.frozen_sharded)


def prepare(model, pl: Placement, trainable: bool, average: bool = False):
    """The model on its device in its dtype, FSDP-wrapped where the placement says so; frozen models get
    requires_grad False and eval mode. `average`: a frozen model whose weights follow the trained one's
    (`ema_update`): float32, sharded exactly as the trained model whatever `train.frozen` says.

    A sharded model of several processes (`shards_from_rank0`) is loaded as verl and torchtune load one: only the
    main process has read the checkpoint (`model` holds its weights there and is a meta-device model, without
    storage, on the others); every process builds the same empty model, shards it, allocates only its own shards
    in the master dtype, and receives them from the main process one tensor at a time
    (`set_model_state_dict(..., broadcast_from_rank0=True)`). No process upcasts or holds the whole model in the
    master dtype: host memory per process is about one checkpoint-dtype copy on the main process plus 1/world of
    the master weights, instead of world x (checkpoint copy + full master copy)."""
    like_policy = trainable or average
    dtype = torch.float32 if average else pl.master_dtype if trainable else pl.compute_dtype
    if shards_from_rank0(pl, like_policy):
        return _shard_from_rank0(model, pl, trainable, dtype)
    model.to(device=pl.device, dtype=dtype)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    if pl.fsdp and (like_policy or pl.frozen_sharded):
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


# ----------------------------------------------------------------------------- this process's part, whole tensors
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard of a sharded (DTensor) one, a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_nbytes(t: torch.Tensor) -> int:
    part = local_tensor(t)
    return part.numel() * part.element_size()


def full_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter (tied ones once) and persistent buffer, one at a time. Sharded
    parameters are all-gathered one by one: every process must consume the iterator in step."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
    yield from persistent_buffers(model)


def local_bytes(model, optimizer=None) -> dict:
    """Bytes this process holds of parameters, gradients and optimiser state (its shards under FSDP)."""
    params = sum(_local_nbytes(p) for p in model.parameters())
    grads = sum(_local_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            opt += sum(_local_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return {"parameter_bytes": params, "gradient_bytes": grads, "optimizer_state_bytes": opt}


@torch.no_grad()
def copy_weights(dst, src) -> None:
    """dst's weights := src's (the same architecture; dst frozen, in its own dtype). Sharded into sharded copies
    each process's shards; into a replica, the full tensors are gathered one at a time."""
    for (name, d), (_, s) in zip(dst.named_parameters(), src.named_parameters(), strict=True):
        if hasattr(d, "to_local") and hasattr(s, "to_local"):
            d.to_local().copy_(s.to_local())
        else:
            d.copy_(s.full_tensor() if hasattr(s, "full_tensor") else s)


@torch.no_grad()
def ema_update(average, model, decay: float) -> None:
    """average := decay x average + (1 - decay) x model, parameter by parameter (an EMA teacher after an optimiser
    step). `average` is placed like `model` (prepare(..., average=True)): under FSDP their shards line up and each
    process updates its own; the model's weights are read as they are (float32 master weights)."""
    for (name, a), (_, m) in zip(average.named_parameters(), model.named_parameters(), strict=True):
        mine, theirs = local_tensor(a), local_tensor(m)
        if mine.shape != theirs.shape:
            raise RuntimeError(f"{name}: the average and the model are not placed alike ({tuple(mine.shape)} vs "
                               f"{tuple(theirs.shape)})")
        mine.mul_(decay).add_(theirs.to(mine.dtype), alpha=1.0 - decay)
